#!/usr/bin/env bash
# Builds the packages of openClusterClaw: clusterclaw-server and clusterclaw-agent, each as .deb
# and .rpm, into target/packages/, versioned from the workspace version.
#
#   packaging/build.sh [--revision N] [--deb-only] [--sign-rpm KEY]
#
# Steps: the `dist` profile (fat LTO, stripped) of both binaries; man pages and shell
# completions generated from the binaries' own command lines; the .debs with cargo-deb
# (installed into target/tools when missing), the .rpms with rpmbuild from
# packaging/rpm/clusterclaw.spec (the `rpm` package is installed with apt when missing).
# --sign-rpm signs the .rpms with that GnuPG key (rpmsign). Prints the files and their sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
profile=dist
bin_dir=$target/$profile
out=$target/packages
tools=$target/tools
revision=1
rpm=1
sign_key=

while [ $# -gt 0 ]; do
	case "$1" in
	--revision)
		revision=${2:?--revision needs a number}
		shift 2
		;;
	--sign-rpm)
		sign_key=${2:?--sign-rpm needs a GnuPG key id}
		shift 2
		;;
	--deb-only)
		rpm=0
		shift
		;;
	-h | --help)
		sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "build.sh: unknown argument $1 (see --help)" >&2
		exit 64
		;;
	esac
done

log() { printf '==> %s\n' "$*" >&2; }

# Tools: cargo subcommands once into target/tools, by the versions this script was written for;
# system tools with apt, from the machine's configured sources.
need_apt() {
	local cmd=$1 pkg=$2
	command -v "$cmd" >/dev/null 2>&1 && return
	log "installing $pkg with apt-get"
	if [ "$(id -u)" != 0 ]; then
		echo "build.sh: $cmd is missing; install the $pkg package (as root: apt-get install $pkg)" >&2
		exit 1
	fi
	if [ -z "${apt_updated:-}" ]; then
		DEBIAN_FRONTEND=noninteractive apt-get update -qq
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
}
need_tool() {
	local name=$1 version=$2
	if [ -x "$tools/bin/$name" ] && "$tools/bin/$name" --version 2>/dev/null | grep -q "$version"; then
		return
	fi
	log "installing $name $version into $tools"
	cargo install --locked --quiet --root "$tools" "$name" --version "$version"
}
need_tool cargo-deb 3.8.0
need_apt dpkg-shlibdeps dpkg-dev
[ "$rpm" = 1 ] && need_apt rpmbuild rpm
export PATH="$tools/bin:$PATH"

version=$(cargo metadata --format-version 1 --no-deps --locked |
	python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "clusterclaw-agent"))')
changelog_version=$(sed -n '1s/^[^(]*(\([^)-]*\).*/\1/p' packaging/deb/changelog)
spec_version=$(sed -n '/^%changelog/{n;s/.* - \([^-]*\)-[^-]*$/\1/p;q}' packaging/rpm/clusterclaw.spec)
for pair in "packaging/deb/changelog:$changelog_version" "the %changelog of packaging/rpm/clusterclaw.spec:$spec_version"; do
	if [ "${pair##*:}" != "$version" ]; then
		echo "build.sh: ${pair%:*} starts with version ${pair##*:}, the workspace version is $version; add an entry for $version" >&2
		exit 1
	fi
done

log "building clusterclaw and clusterclaw-agent $version (profile $profile)"
cargo build --locked --profile "$profile" -p clusterclaw-server --bin clusterclaw -p clusterclaw-agent --bin clusterclaw-agent

log "generating man pages and completions"
rm -rf "$bin_dir/docs"
"$bin_dir/clusterclaw" generate-docs "$bin_dir/docs/server"
"$bin_dir/clusterclaw-agent" --generate-docs "$bin_dir/docs/agent"
find "$bin_dir/docs" -name '*.[18]' -exec gzip -9n {} +

mkdir -p "$out"
rm -f "$out"/clusterclaw-*_"$version-$revision"_*.deb "$out"/clusterclaw-*-"$version-$revision".*.rpm
for pkg in clusterclaw-server clusterclaw-agent; do
	log "packaging $pkg.deb"
	cargo deb --no-build --locked --profile "$profile" -p "$pkg" --deb-revision "$revision" --output "$out/" >/dev/null
done
if [ "$rpm" = 1 ]; then
	log "packaging clusterclaw-server.rpm and clusterclaw-agent.rpm"
	top=$(mktemp -d)
	trap 'rm -rf "$top"' EXIT
	rpmbuild -bb --quiet \
		--define "_topdir $top" \
		--define "ccver $version" --define "ccrel $revision" \
		--define "ccdist $bin_dir" --define "ccroot $root" \
		packaging/rpm/clusterclaw.spec >/dev/null
	if [ -n "$sign_key" ]; then
		log "signing the .rpms with key $sign_key"
		rpmsign --addsign --define "_gpg_name $sign_key" --define "__gpg $(command -v gpg)" "$top"/RPMS/*/clusterclaw-*.rpm >/dev/null
	fi
	mv "$top"/RPMS/*/clusterclaw-*.rpm "$out/"
fi

log "done: $out"
for f in "$out"/clusterclaw-*_"$version-$revision"_*.deb "$out"/clusterclaw-*-"$version-$revision".*.rpm; do
	[ -e "$f" ] || continue
	printf '%-60s %8d KiB\n' "$(basename "$f")" $(($(stat -c %s "$f") / 1024))
done
printf '%-60s %8d KiB\n' "stripped clusterclaw-agent" $(($(stat -c %s "$bin_dir/clusterclaw-agent") / 1024))
printf '%-60s %8d KiB\n' "stripped clusterclaw" $(($(stat -c %s "$bin_dir/clusterclaw") / 1024))
