//! `clusterclaw completion bash|zsh|fish`: shell completion scripts.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, CliResult, stdout_error};

#[derive(Args, Debug)]
#[command(
    after_help = "Install, e.g.:\n  clusterclaw completion bash > /etc/bash_completion.d/clusterclaw\n  clusterclaw completion zsh > \"${fpath[1]}/_clusterclaw\"\n  clusterclaw completion fish > ~/.config/fish/completions/clusterclaw.fish"
)]
pub struct CompletionArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(args: CompletionArgs) -> CliResult {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "clusterclaw", &mut script);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "clusterclaw", &mut script);
            let script = String::from_utf8(script).unwrap();
            assert!(
                script.contains("apply") && script.contains("describe"),
                "{shell}"
            );
        }
    }
}
