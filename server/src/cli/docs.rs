//! `clusterclaw generate-docs DIR` (hidden): the man pages and shell completion scripts the
//! packages install, generated from the command-line definition itself.

use std::io;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, CliError, CliResult};

#[derive(Args, Debug)]
pub struct DocsArgs {
    /// Directory to write `man/` (section 1 pages, one per subcommand) and `completions/`
    /// (bash, zsh, fish) into; created if missing.
    #[arg(value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: DocsArgs) -> CliResult {
    write(&args.out)
        .map(|_| ())
        .map_err(|e| CliError::io(format!("cannot write into {}", args.out.display()), e))
}

/// Writes the man pages and completion scripts; returns the files written.
pub fn write(out: &Path) -> io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        written.push(clap_complete::generate_to(
            shell,
            &mut Cli::command(),
            "clusterclaw",
            &completions,
        )?);
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_scripts_for_every_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path()).unwrap();
        let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
        let names: Vec<String> = files.iter().map(name).collect();
        for expected in [
            "clusterclaw.1",
            "clusterclaw-server.1",
            "clusterclaw-apply.1",
            "clusterclaw-token-create.1",
            "clusterclaw.bash",
            "_clusterclaw",
            "clusterclaw.fish",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing: {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("generate-docs")),
            "the hidden command has no page: {names:?}"
        );
        let top = std::fs::read_to_string(dir.path().join("man/clusterclaw.1")).unwrap();
        assert!(top.starts_with(".ie \\n(.g .ds Aq") || top.contains(".TH clusterclaw 1"));
        let server = std::fs::read_to_string(dir.path().join("man/clusterclaw-server.1")).unwrap();
        assert!(server.contains("CLUSTERCLAW_SERVER_DATA_DIR"), "{server}");
        let bash =
            std::fs::read_to_string(dir.path().join("completions/clusterclaw.bash")).unwrap();
        assert!(bash.contains("describe") && bash.contains("--api-listen"));
    }
}
