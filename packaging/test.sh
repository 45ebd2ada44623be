#!/usr/bin/env bash
# End-to-end test of the packages, as an administrator would use them:
#
#   packaging/test.sh
#
#  1. builds the .debs and .rpms (packaging/build.sh; the .rpms signed with a throwaway key),
#     and a second revision of the .debs to upgrade to;
#  2. lintian on the .debs and rpmlint on the .rpms: no errors allowed;
#  3. a Debian root filesystem made with debootstrap from the machine's apt sources, imported
#     into the local Docker engine (cached in target/pkgtest between runs);
#  4. in a container of it that boots systemd: installs the server with dpkg -i (user,
#     files, permissions, --version, the unit active through READY=1, watchdog pings), then the
#     agent with a join token already provisioned, and measures dpkg -i -> host Ready on the
#     server; upgrades both (configuration edits kept, identity kept), removes (configuration
#     and state kept), purges (state deleted).
#
# Needs root, a Docker engine and the apt sources of a Debian-family machine. Installs what it
# misses: debootstrap, lintian, rpmlint with apt, cargo-deb into target/tools.
# shellcheck disable=SC2016 # dpkg-query's ${Field} formats are single-quoted on purpose
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
out=$target/packages
cache=$target/pkgtest
container=clusterclaw-pkgtest-$$
work=$(mktemp -d)
started=$(date +%s)

log() { printf '==> %s\n' "$*" >&2; }
fail() {
	printf 'FAIL: %s\n' "$*" >&2
	exit 1
}
cleanup() {
	docker rm -f "$container" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT

declare -a timings=()
phase_start=$(date +%s)
phase() {
	local now
	now=$(date +%s)
	[ -n "${phase_name:-}" ] && timings+=("$(printf '%-34s %4d s' "$phase_name" $((now - phase_start)))")
	phase_name=$1
	phase_start=$now
	log "$1"
}

if [ "$(id -u)" != 0 ]; then
	echo "test.sh: run as root (debootstrap, docker import and apt need it)" >&2
	exit 1
fi
docker info >/dev/null 2>&1 || {
	echo "test.sh: no Docker engine answers on this machine" >&2
	exit 1
}

# The machine's apt mirror and suite, read from its configured sources (deb822 or one-line).
apt_source() {
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '
			function done_() { if (deb && uri && suite) { print uri, suite; exit } deb = 0; uri = ""; suite = "" }
			/^[[:space:]]*$/ { done_(); next }
			/^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
			/^URIs:/ { uri = $2 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /[-\/]/) { suite = $i; break } }
			END { done_() }
		' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) !~ /[-\/]/) { print $i, $(i + 1); exit } }' "$f"
	done
}

apt_updated=
need_apt() {
	local cmd=$1 pkg=$2
	command -v "$cmd" >/dev/null 2>&1 && return
	log "installing $pkg with apt-get"
	if [ -z "$apt_updated" ]; then
		DEBIAN_FRONTEND=noninteractive apt-get update -qq
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
}

phase "tools"
need_apt debootstrap debootstrap
need_apt lintian lintian
need_apt rpmlint rpmlint
need_apt gpg gpg
need_apt gpg-agent gpg-agent

# 1. Packages.
phase "build packages"
export GNUPGHOME=$work/gnupg
mkdir -m 0700 "$GNUPGHOME"
gpg --batch --quiet --passphrase '' --quick-gen-key "openClusterClaw package test <pkgtest@clusterclaw.io>" rsa2048 sign 1d 2>/dev/null
packaging/build.sh --sign-rpm pkgtest@clusterclaw.io
packaging/build.sh --revision 2 --deb-only >/dev/null
version=$("$target/dist/clusterclaw-agent" --version | awk '{ print $2 }')
deb() { echo "$out/clusterclaw-$1_$version-$2_amd64.deb"; }
rpmfile() { echo "$out/clusterclaw-$1-$version-1.x86_64.rpm"; }
for f in "$(deb server 1)" "$(deb agent 1)" "$(deb server 2)" "$(deb agent 2)" "$(rpmfile server)" "$(rpmfile agent)"; do
	[ -f "$f" ] || fail "$f was not built"
done
agent_binary_kib=$(($(stat -c %s "$target/dist/clusterclaw-agent") / 1024))
agent_deb_kib=$(($(stat -c %s "$(deb agent 1)") / 1024))
agent_rpm_kib=$(($(stat -c %s "$(rpmfile agent)") / 1024))
[ "$agent_binary_kib" -lt $((15 * 1024)) ] || fail "the stripped agent is $agent_binary_kib KiB, over 15 MiB"
[ "$agent_deb_kib" -lt $((6 * 1024)) ] || fail "the agent .deb is $agent_deb_kib KiB, over 6 MiB"
[ "$agent_rpm_kib" -lt $((6 * 1024)) ] || fail "the agent .rpm is $agent_rpm_kib KiB, over 6 MiB"

# 2. Linters.
phase "lintian and rpmlint"
lint_status=0
lintian --fail-on error --tag-display-limit 0 "$(deb server 1)" "$(deb agent 1)" >"$work/lintian.log" 2>&1 || lint_status=$?
grep -v '^running with root privileges' "$work/lintian.log" || true
[ "$lint_status" = 0 ] || fail "lintian reports errors (above)"
# The signature is checked against the throwaway key, imported into a private rpm database.
mkdir -p "$work/rpmhome"
printf '%%_dbpath %s/rpmdb\n' "$work" >"$work/rpmhome/.rpmmacros"
gpg --batch --armor --export pkgtest@clusterclaw.io >"$work/pkgtest.asc"
HOME=$work/rpmhome rpm --initdb
HOME=$work/rpmhome rpm --import "$work/pkgtest.asc"
sigs=$(HOME=$work/rpmhome rpm -K "$(rpmfile server)" "$(rpmfile agent)") || true
[ "$(grep -c ': digests signatures OK$' <<<"$sigs")" = 2 ] || fail "rpm -K: $sigs"
HOME=$work/rpmhome rpmlint -c packaging/rpm/rpmlint.toml "$(rpmfile server)" "$(rpmfile agent)" ||
	fail "rpmlint reports errors (above)"
# What the .rpms hold, as rpm sees it.
rpm_lists=$(rpm -qp --nosignature -l "$(rpmfile server)" "$(rpmfile agent)")
for f in /usr/bin/clusterclaw /usr/bin/clusterclaw-agent /usr/lib/systemd/system/clusterclaw-server.service \
	/usr/lib/systemd/system/clusterclaw-agent.service /usr/share/man/man1/clusterclaw-server.1.gz \
	/usr/share/man/man8/clusterclaw-agent.8.gz /usr/share/bash-completion/completions/clusterclaw \
	/usr/share/zsh/site-functions/_clusterclaw-agent /usr/lib/sysusers.d/clusterclaw-server.conf \
	/usr/share/clusterclaw/grafana/clusterclaw-dashboard.json /usr/share/clusterclaw/prometheus/clusterclaw-alerts.yml \
	/usr/share/clusterclaw/prometheus/clusterclaw-alerts.test.yml; do
	grep -qx "$f" <<<"$rpm_lists" || fail "the .rpms lack $f"
done
[ "$(rpm -qp --nosignature --configfiles "$(rpmfile server)" "$(rpmfile agent)" | sort | tr '\n' ' ')" = "/etc/clusterclaw/agent.toml /etc/clusterclaw/server.toml " ] ||
	fail "the .rpms' config files are not exactly server.toml and agent.toml"
grep -q 'useradd --system' <<<"$(rpm -qp --nosignature --scripts "$(rpmfile server)")" || fail "the server .rpm does not create its user"

# 3. The Debian root filesystem, cached.
phase "root filesystem"
read -r mirror suite < <(apt_source | head -n1) || true
if [ -z "${mirror:-}" ] || [ -z "${suite:-}" ]; then
	fail "no deb mirror and suite in /etc/apt/sources.list*"
fi
arch=$(dpkg --print-architecture)
# systemd to boot; the packages' dependencies beyond the minimal base.
include=systemd,systemd-sysv,dbus,ca-certificates
tag=$suite-$arch-$(printf '%s' "$include" | md5sum | cut -c1-8)
image=clusterclaw-pkgtest:$tag
tarball=$cache/debian-$tag-rootfs.tar
mkdir -p "$cache"
if ! docker image inspect "$image" >/dev/null 2>&1; then
	if [ ! -s "$tarball" ]; then
		log "debootstrap $suite ($arch) from $mirror"
		rootfs=$work/rootfs
		debootstrap --variant=minbase --include="$include" --arch="$arch" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
			{
				tail -20 "$work/debootstrap.log" >&2
				fail "debootstrap failed"
			}
		tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
		mv "$tarball.tmp" "$tarball"
		rm -rf "$rootfs"
	fi
	docker import -c 'CMD ["/sbin/init"]' "$tarball" "$image" >/dev/null
fi

# 4. The container: systemd as PID 1, the host's Docker socket for the agent.
phase "boot systemd in a container"
# --privileged would be simplest, but an engine that itself lacks a capability (here:
# CAP_SYS_RESOURCE) cannot grant it; all capabilities the engine has, no seccomp, the host's
# cgroup v1 tree and tmpfs /run boot systemd as well.
docker run -d --name "$container" --hostname pkgtest \
	--cap-add ALL --cap-drop SYS_RESOURCE \
	--security-opt seccomp=unconfined --security-opt apparmor=unconfined \
	--cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
	--tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
	-v /var/run/docker.sock:/run/docker.sock \
	-e container=docker "$image" /sbin/init >/dev/null
cx() { docker exec "$container" "$@"; }
csh() { docker exec "$container" sh -c "$*"; }
state=
for _ in $(seq 1 60); do
	state=$(cx systemctl is-system-running 2>/dev/null || true)
	case "$state" in running | degraded) break ;; esac
	sleep 0.5
done
case "$state" in
running | degraded) ;;
*) fail "systemd did not boot in the container (state: ${state:-none}); see README.md, Install the packages" ;;
esac
# (not into /tmp: docker cp writes beneath the tmpfs mount)
cx mkdir -p /root/pkgs
docker cp "$(deb server 1)" "$container:/root/pkgs/"
docker cp "$(deb agent 1)" "$container:/root/pkgs/"
docker cp "$(deb server 2)" "$container:/root/pkgs/"
docker cp "$(deb agent 2)" "$container:/root/pkgs/"
srv1=/root/pkgs/$(basename "$(deb server 1)")
agt1=/root/pkgs/$(basename "$(deb agent 1)")
srv2=/root/pkgs/$(basename "$(deb server 2)")
agt2=/root/pkgs/$(basename "$(deb agent 2)")

host_ready() { grep -Eq '"phase": ?"Ready"' <<<"$(cli get hosts pkgtest -o json 2>/dev/null)"; }
expect_eq() { [ "$2" = "$3" ] || fail "$1: expected '$3', got '$2'"; }
unit_prop() { cx systemctl show -p "$2" --value "$1"; }
wait_active() {
	local s
	for _ in $(seq 1 100); do
		s=$(cx systemctl is-active "$1" || true)
		[ "$s" = active ] && return
		sleep 0.1
	done
	cx systemctl status --no-pager "$1" >&2 || true
	cx journalctl -u "$1" --no-pager -n 30 >&2 || true
	fail "$1 is $s, not active"
}
pings_after() {
	# The unit's last watchdog ping is newer than $2 (monotonic µs).
	local t
	for _ in $(seq 1 150); do
		t=$(unit_prop "$1" WatchdogTimestampMonotonic)
		[ "${t:-0}" -gt "$2" ] && return
		sleep 0.1
	done
	fail "$1 sent no watchdog ping"
}

phase "install the server"
cx dpkg -i "$srv1" >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -i $srv1"
}
expect_eq "clusterclaw --version" "$(cx clusterclaw --version)" "clusterclaw $version"
for f in /usr/bin/clusterclaw /etc/clusterclaw/server.toml /lib/systemd/system/clusterclaw-server.service \
	/usr/share/man/man1/clusterclaw.1.gz /usr/share/man/man1/clusterclaw-server.1.gz \
	/usr/share/bash-completion/completions/clusterclaw /usr/share/zsh/vendor-completions/_clusterclaw \
	/usr/share/fish/vendor_completions.d/clusterclaw.fish /usr/lib/sysusers.d/clusterclaw-server.conf \
	/usr/share/clusterclaw/openclaw.schema.json /usr/share/clusterclaw/grafana/clusterclaw-dashboard.json \
	/usr/share/clusterclaw/prometheus/clusterclaw-alerts.yml /usr/share/clusterclaw/prometheus/clusterclaw-alerts.test.yml; do
	cx test -f "$f" || fail "the server package did not install $f"
done
expect_eq "conffiles" "$(cx dpkg-query -W -f='${Conffiles}' clusterclaw-server | awk 'NF { print $1 }')" /etc/clusterclaw/server.toml
expect_eq "/usr/bin/clusterclaw" "$(cx stat -c '%a %U' /usr/bin/clusterclaw)" "755 root"
expect_eq "server.toml" "$(cx stat -c '%a %U' /etc/clusterclaw/server.toml)" "644 root"
expect_eq "the clusterclaw user" "$(cx getent passwd clusterclaw | cut -d: -f6,7)" "/var/lib/clusterclaw:/usr/sbin/nologin"
expect_eq "/var/lib/clusterclaw" "$(cx stat -c '%a %U %G' /var/lib/clusterclaw)" "700 clusterclaw clusterclaw"
cx systemd-analyze verify --man=no /lib/systemd/system/clusterclaw-server.service || fail "systemd-analyze verify clusterclaw-server.service"
expect_eq "enabled" "$(cx systemctl is-enabled clusterclaw-server)" enabled
wait_active clusterclaw-server
expect_eq "Type" "$(unit_prop clusterclaw-server Type)" notify
# The status line comes with READY=1, sent once both ports are bound.
status=$(unit_prop clusterclaw-server StatusText)
case "$status" in "API http://127.0.0.1:7080, agent port 0.0.0.0:7443") ;; *) fail "server status: $status" ;; esac
pings_after clusterclaw-server "$(unit_prop clusterclaw-server ActiveEnterTimestampMonotonic)"
expect_eq "the server's user" "$(cx stat -c %U "/proc/$(unit_prop clusterclaw-server MainPID)")" clusterclaw
expect_eq "the secrets key file" "$(cx stat -c '%a %U' /var/lib/clusterclaw/secrets.key)" "600 clusterclaw"
admin_token=$(cx cat /var/lib/clusterclaw/admin.token)
cli() { docker exec -e CLUSTERCLAW_TOKEN="$admin_token" "$container" clusterclaw "$@"; }
cli get hosts >/dev/null 2>&1 || fail "clusterclaw get hosts against the packaged server"
# The watchdog is live: a server that stops answering (SIGSTOP) is killed and restarted.
csh "mkdir -p /run/systemd/system/clusterclaw-server.service.d &&
	printf '[Service]\nWatchdogSec=2s\n' >/run/systemd/system/clusterclaw-server.service.d/watchdog.conf &&
	systemctl daemon-reload && systemctl restart clusterclaw-server"
wait_active clusterclaw-server
restarts=$(unit_prop clusterclaw-server NRestarts)
csh "kill -STOP $(unit_prop clusterclaw-server MainPID)"
restarted=
for _ in $(seq 1 100); do
	[ "$(unit_prop clusterclaw-server NRestarts)" -gt "$restarts" ] && restarted=1 && break
	sleep 0.1
done
[ -n "$restarted" ] || fail "a stopped server was not restarted by the watchdog"
csh "rm -r /run/systemd/system/clusterclaw-server.service.d && systemctl daemon-reload && systemctl restart clusterclaw-server"
wait_active clusterclaw-server

phase "install the agent, enroll"
# The agent unit is configured-gated: with nothing provisioned it stays down.
join_token=$(cli token create join --ttl 10m 2>/dev/null)
[ -n "$join_token" ] || fail "no join token"
csh "cp /var/lib/clusterclaw/pki/ca.crt /etc/clusterclaw/ca.crt &&
	umask 077 && printf '%s\n' '$join_token' >/etc/clusterclaw/join-token &&
	printf 'CLUSTERCLAW_AGENT_SERVER=https://127.0.0.1:7443\nCLUSTERCLAW_AGENT_LABELS=pkgtest=yes\n' >/etc/default/clusterclaw-agent"
t0=$(date +%s%N)
cx dpkg -i "$agt1" >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -i $agt1"
}
ready=
for _ in $(seq 1 300); do
	if host_ready; then
		ready=$(date +%s%N)
		break
	fi
	sleep 0.05
done
[ -n "$ready" ] || {
	cx journalctl -u clusterclaw-agent --no-pager -n 40 >&2 || true
	fail "the host did not become Ready within 15 s of dpkg -i"
}
enroll_ms=$(((ready - t0) / 1000000))
printf 'dpkg -i clusterclaw-agent -> host Ready on the server: %d.%03d s\n' $((enroll_ms / 1000)) $((enroll_ms % 1000))
[ "$enroll_ms" -lt 5000 ] || fail "dpkg -i -> host Ready took $enroll_ms ms, over 5 s"
cli get hosts
expect_eq "clusterclaw-agent --version" "$(cx clusterclaw-agent --version)" "clusterclaw-agent $version"
for f in /usr/bin/clusterclaw-agent /etc/clusterclaw/agent.toml /lib/systemd/system/clusterclaw-agent.service \
	/usr/share/man/man8/clusterclaw-agent.8.gz /usr/share/bash-completion/completions/clusterclaw-agent \
	/usr/share/doc/clusterclaw-agent/README.Debian /var/lib/clusterclaw-agent/host.json; do
	cx test -f "$f" || fail "$f is missing after installing the agent"
done
cx test ! -e /etc/clusterclaw/join-token || fail "the used join token file was not deleted"
expect_eq "/var/lib/clusterclaw-agent" "$(cx stat -c '%a %U' /var/lib/clusterclaw-agent)" "700 root"
expect_eq "host.key" "$(cx stat -c '%a' /var/lib/clusterclaw-agent/host.key)" "600"
cx systemd-analyze verify --man=no /lib/systemd/system/clusterclaw-agent.service || fail "systemd-analyze verify clusterclaw-agent.service"
wait_active clusterclaw-agent
expect_eq "agent Type" "$(unit_prop clusterclaw-agent Type)" notify
expect_eq "agent KillMode" "$(unit_prop clusterclaw-agent KillMode)" process
case "$(unit_prop clusterclaw-agent StatusText)" in "host pkgtest of https://127.0.0.1:7443") ;; *) fail "agent status: $(unit_prop clusterclaw-agent StatusText)" ;; esac
pings_after clusterclaw-agent "$(unit_prop clusterclaw-agent ActiveEnterTimestampMonotonic)"
identity=$(cx cat /var/lib/clusterclaw-agent/host.json)

phase "upgrade"
csh "sed -i 's/^resync_interval = .*/resync_interval = \"20s\"/' /etc/clusterclaw/server.toml &&
	printf '\n[labels]\nedited = \"yes\"\n' >>/etc/clusterclaw/agent.toml"
server_pid=$(unit_prop clusterclaw-server MainPID)
agent_pid=$(unit_prop clusterclaw-agent MainPID)
cx dpkg -i "$srv2" "$agt2" >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -i of the second revision"
}
expect_eq "upgraded server" "$(cx dpkg-query -W -f='${Version}' clusterclaw-server)" "$version-2"
expect_eq "upgraded agent" "$(cx dpkg-query -W -f='${Version}' clusterclaw-agent)" "$version-2"
cx grep -q '^resync_interval = "20s"' /etc/clusterclaw/server.toml || fail "the edit of server.toml was lost on upgrade"
cx grep -q '^edited = "yes"' /etc/clusterclaw/agent.toml || fail "the edit of agent.toml was lost on upgrade"
cx test ! -e /etc/clusterclaw/server.toml.dpkg-new || fail "the upgrade left server.toml.dpkg-new"
wait_active clusterclaw-server
wait_active clusterclaw-agent
[ "$(unit_prop clusterclaw-server MainPID)" != "$server_pid" ] || fail "the server was not restarted by the upgrade"
[ "$(unit_prop clusterclaw-agent MainPID)" != "$agent_pid" ] || fail "the agent was not restarted by the upgrade"
expect_eq "host identity after the upgrade" "$(cx cat /var/lib/clusterclaw-agent/host.json)" "$identity"
ok=
for _ in $(seq 1 100); do
	host_ready && ok=1 && break
	sleep 0.1
done
[ -n "$ok" ] || fail "the host is not Ready after the upgrade"

phase "remove"
cx dpkg -r clusterclaw-agent clusterclaw-server >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -r"
}
for f in /usr/bin/clusterclaw /usr/bin/clusterclaw-agent /lib/systemd/system/clusterclaw-server.service; do
	cx test ! -e "$f" || fail "$f is still there after dpkg -r"
done
for f in /etc/clusterclaw/server.toml /etc/clusterclaw/agent.toml /var/lib/clusterclaw/clusterclaw.db \
	/var/lib/clusterclaw/admin.token /var/lib/clusterclaw-agent/host.json; do
	cx test -e "$f" || fail "$f was deleted by dpkg -r; remove keeps configuration and state"
done
cx grep -q '^resync_interval = "20s"' /etc/clusterclaw/server.toml || fail "dpkg -r changed server.toml"
for u in clusterclaw-server clusterclaw-agent; do
	s=$(cx systemctl is-active "$u" || true)
	[ "$s" != active ] || fail "$u still runs after dpkg -r"
done

phase "purge"
cx dpkg -P clusterclaw-agent clusterclaw-server >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -P"
}
for f in /etc/clusterclaw/server.toml /etc/clusterclaw/agent.toml /var/lib/clusterclaw /var/lib/clusterclaw-agent; do
	cx test ! -e "$f" || fail "$f is still there after dpkg -P"
done
[ -z "$(cx dpkg-query -W -f='${Status}' clusterclaw-server clusterclaw-agent 2>/dev/null | grep -v 'not-installed' || true)" ] ||
	fail "dpkg still knows the packages after purge"

phase "install the agent unconfigured"
# Without a join token or an earlier enrollment the unit is enabled but does not run.
cx dpkg -i "$agt2" >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -i $agt2 on an unconfigured host"
}
expect_eq "unconfigured agent enabled" "$(cx systemctl is-enabled clusterclaw-agent)" enabled
expect_eq "unconfigured agent" "$(cx systemctl is-active clusterclaw-agent || true)" inactive
expect_eq "unconfigured agent condition" "$(unit_prop clusterclaw-agent ConditionResult)" no
cx dpkg -P clusterclaw-agent >/dev/null 2>&1 || fail "dpkg -P clusterclaw-agent"

phase "done"
echo
echo "packaging test passed"
printf '  %s\n' "${timings[@]}"
printf '  %-34s %4d s\n' "total" $(($(date +%s) - started))
printf '  stripped agent %d KiB, agent .deb %d KiB, agent .rpm %d KiB, dpkg -i -> Ready %d ms\n' \
	"$agent_binary_kib" "$agent_deb_kib" "$agent_rpm_kib" "$enroll_ms"
