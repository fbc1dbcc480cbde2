//! The stock Debian 12 cloud image (images/debian), unmodified, booted by
//! berth-agent and berth-vmm on kvm_amd inside the emulated-AMD-V harness
//! (docs/testing.md), as a cloud user would get it: 2 vCPUs, 1 GiB, the
//! kernel on its own disk, a NIC on a tap with a static address, a
//! hostname and an SSH key given through the VM document's cloud-init part.
//! The test then logs in with `ssh -i <key>` from the inner host.
//!
//! Run it alone: `cargo test -p berth-tests --test debian_guest -- --nocapture`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_tests::harness::{run_scenarios_on, InnerHost, Scenario, ScenarioResult};
use berth_tests::{binary, cache_dir, image_dir, scratch_dir};

const IMAGE: &str = "debian-12-genericcloud-amd64.raw";
const HOSTNAME: &str = "berth-debian-7";
const GUEST_IP: &str = "10.0.2.15";

/// A whole first boot with cloud-init takes about a minute in the harness;
/// the scenario boots three times and waits on SSH.
const SCENARIO_BUDGET_S: u32 = 1800;

/// The inner host's CPU model. With `-cpu max`, QEMU's TCG emulation of
/// AVX under nested SVM corrupts guest state now and then (a triple fault
/// while cloud-init generates the host keys); docs/testing.md has the study.
const INNER_CPU: &str = "max,-avx,-avx2,-avx512f";

/// The image inside an ext4 data disk for the inner host (a 2 GiB raw image
/// does not fit an initramfs), cached beside the image it holds.
fn data_disk(image: &Path) -> PathBuf {
    let key = image.file_name().unwrap().to_string_lossy().into_owned();
    let dir = cache_dir().join("harness");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join(format!("data-{key}.ext4"));
    if disk.exists() {
        return disk;
    }
    let staging = dir.join(format!("data-{key}.staging.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::hard_link(image.join(IMAGE), staging.join(IMAGE))
        .unwrap_or_else(|e| panic!("link {} into {}: {e}", IMAGE, staging.display()));
    let tmp = disk.with_extension(format!("tmp.{}", std::process::id()));
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q", "-L", "harness-data", "-d"])
        .arg(&staging)
        .arg(&tmp)
        .arg("4G")
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    let _ = std::fs::remove_dir_all(&staging);
    assert!(out.status.success(), "mkfs.ext4 -d: {out:?}");
    std::fs::rename(&tmp, &disk).unwrap();
    disk
}

/// An ed25519 key pair for the test user, made once per cache.
fn ssh_key() -> (PathBuf, String) {
    let dir = cache_dir().join("harness");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("debian-ssh-key");
    if !key.exists() {
        let tmp = scratch_dir("debian-ssh-key").join("id");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "berth-test", "-f"])
            .arg(&tmp)
            .output()
            .expect("ssh-keygen (openssh-client)");
        assert!(out.status.success(), "ssh-keygen: {out:?}");
        std::fs::copy(tmp.with_extension("pub"), key.with_extension("pub")).unwrap();
        std::fs::copy(&tmp, &key).unwrap();
    }
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

/// The inner host's agents: the first, and a second to migrate to (`2`).
fn agent_config(suffix: &str) -> String {
    format!(
        "state_root = \"/var/lib/berth{suffix}\"\n\
     socket = \"/run/berth{suffix}/agent.sock\"\n\
     migration_listen = \"127.0.0.1\"\n\
     kernel_roots = [\"/data\"]\n\
     disk_roots = [\"/data\"]\n\
     vmm_binary = \"/usr/bin/berth-vmm\"\n\
     reserved_memory_mib = 256\n\
     cgroup_version = \"off\"\n\
     [jail]\n\
     # The inner host runs from its initramfs, where a jail's pivot_root\n\
     # cannot work; seccomp stays on.\n\
     enabled = false\n"
    )
}

fn vm_spec(public_key: &str) -> String {
    format!(
        "id = \"debian\"\nname = \"debian\"\nvcpus = 2\nmemory_mib = 1024\n\
         [kernel]\nfrom_disk = true\ncmdline = \"console=ttyS0\"\n\
         [[disks]]\npath = \"/data/{IMAGE}\"\n\
         [[nics]]\ntap = \"tap0\"\nbridge = \"br0\"\nmac = \"52:54:00:12:34:56\"\n\
         [rng]\n\
         [cloud_init]\nhostname = \"{HOSTNAME}\"\nssh_authorized_keys = [\"{public_key}\"]\n\
         [[cloud_init.nics]]\naddress = \"{GUEST_IP}/24\"\ngateway = \"10.0.2.1\"\n"
    )
}

/// What the inner host runs: the first boot and its checks, power-off, a
/// second start; with `lifecycle`, then an SSH session across a live
/// snapshot and a migration, and a reboot. Each step prints `DEBIAN-<what>`
/// lines the test reads; times are seconds since the boot's start.
fn script(lifecycle: bool) -> String {
    let mut s = format!(
        r#"# harness-budget: {SCENARIO_BUDGET_S}
ip link set lo up
ip link add br0 type bridge && ip addr add 10.0.2.1/24 dev br0 && ip link set br0 up
mkdir -p /var/lib/berth /run/berth
berth-agent --config /etc/berth/agent.toml 2>/tmp/agent.log &
for i in $(seq 100); do [ -S /run/berth/agent.sock ] && break; sleep 0.1; done
console=/var/lib/berth/vms/debian/run/console.log
now() {{ awk '{{ printf "%d", $1 }}' /proc/uptime; }}
state() {{ nodectl --json show debian | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p' | head -1; }}
SSH="ssh -i /root/.ssh/id -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 -o LogLevel=ERROR debian@{GUEST_IP}"
# Waits for $1 in the console written since byte $2, at most $3 s.
console_has() {{ tail -c +$(( $2 + 1 )) $console 2>/dev/null | grep -q "$1"; }}
wait_console() {{ for i in $(seq $3); do console_has "$1" $2 && return 0; sleep 1; done; return 1; }}
wait_ssh() {{ for i in $(seq $1); do $SSH true 2>/dev/null && return 0; sleep 2; done; return 1; }}
wait_state() {{ for i in $(seq $2); do [ "$(state)" = "$1" ] && return 0; sleep 1; done; return 1; }}
last_exit() {{ nodectl --json show debian | sed -n 's/.*"last_exit": *"\([^"]*\)".*/\1/p'; }}
# Waits for a boot ($1 names it) to reach login: on the console written
# since byte $2, then SSH. Fails at once if the VM ends first.
boot() {{
    name=$1; since=$2; t0=$(now)
    for i in $(seq 400); do
        console_has 'login:' $since && break
        [ $(( i % 5 )) = 0 ] && case "$(state)" in Crashed|Stopped) break;; esac
        sleep 1
    done
    if ! console_has 'login:' $since; then echo "DEBIAN-NO-LOGIN $name ($(state): $(last_exit))"; return 1; fi
    echo "DEBIAN-LOGIN $name s=$(( $(now) - t0 ))"
    if wait_ssh 150; then echo "DEBIAN-SSH $name s=$(( $(now) - t0 ))"; else echo "DEBIAN-NO-SSH $name"; return 1; fi
}}
# Starts the VM and boots it. The emulated AMD-V host now and then
# triple-faults a nested guest whatever it runs (docs/testing.md): a boot
# that ends in a triple fault is started again, at most twice, and says so
# (DEBIAN-RETRY, which the test repeats on stderr).
start_boot() {{
    for attempt in 1 2 3; do
        since=$(stat -c %s $console 2>/dev/null || echo 0)
        nodectl start debian >/dev/null || return 1
        boot $1 $since && return 0
        case "$(last_exit)" in
            *"triple fault"*) echo "DEBIAN-RETRY $1 attempt $attempt: $(last_exit)" ;;
            *) return 1 ;;
        esac
    done
    return 1
}}
fail() {{
    echo "DEBIAN-FAILED $1"
    echo "--- data disk"; grep -E 'vd|data' /proc/partitions /proc/mounts; ls -la /data; dmesg | tail -20
    echo "--- console"; tail -c 20000 $console
    echo "--- agent log"; tail -c 6000 /tmp/agent.log
    echo "--- vmm log"; tail -c 3000 /var/lib/berth/vms/debian/vmm.log
    nodectl --json show debian
    exit 1
}}

nodectl create -f /etc/berth/debian.toml || fail create
start_boot first || fail "first boot"
$SSH 'echo nproc=$(nproc); grep MemTotal /proc/meminfo; echo hostname=$(hostname);
      echo cloud-init=$(cloud-init status --wait | sed -n "s/^status: //p");
      echo root=$(findmnt -n -o SOURCE /); echo instance=$(cat /var/lib/cloud/data/instance-id);
      echo kernel=$(uname -r)' | sed 's/^/DEBIAN-GUEST first /'
$SSH 'cloud-init status --long; sudo grep -E "WARNING|ERROR|Traceback" /var/log/cloud-init.log | tail -20' | sed 's/^/DEBIAN-CLOUD-INIT /'

# poweroff: the VMM ends with status 0 and the VM is Stopped, not Crashed.
$SSH 'sudo systemctl poweroff' || true
wait_state Stopped 120 || fail "poweroff did not stop the VM (state $(state))"
echo "DEBIAN-AFTER-POWEROFF state=$(state)"
echo "DEBIAN-LAST-EXIT $(nodectl --json show debian | sed -n 's/.*"last_exit": *"\([^"]*\)".*/\1/p')"

# Start again: not a first boot (same instance-id).
start_boot second || fail "second boot"
$SSH 'echo instance=$(cat /var/lib/cloud/data/instance-id); echo boots=$(journalctl --list-boots 2>/dev/null | wc -l);
      echo hostname=$(hostname)' | sed 's/^/DEBIAN-GUEST second /'

"#
    );
    if lifecycle {
        s.push_str(LIFECYCLE);
    } else {
        s.push_str("nodectl stop debian --force >/dev/null\n");
    }
    s.push_str("echo \"DEBIAN-DONE\"\n");
    s
}

/// The on-demand part, after the second boot (see [`script`]).
const LIFECYCLE: &str = r#"
# An SSH session open across a live snapshot and restore, then across a
# migration to a second agent: an echo loop fed from a FIFO, idle while
# the VM moves, asked again after.
mkfifo /tmp/session-in
exec 7<>/tmp/session-in
$SSH 'while read l; do echo "echo:$l"; done' </tmp/session-in >/tmp/session-out 2>&1 &
session=$!
ask() { echo "$1" >&7; for i in $(seq $2); do grep -q "echo:$1" /tmp/session-out && return 0; sleep 1; done; return 1; }
ask before-snapshot 60 || fail "the SSH session does not answer"
nodectl snapshot create debian live-1 --live >/dev/null || fail "live snapshot"
nodectl stop debian --force >/dev/null || fail "stop after the snapshot"
wait_state Stopped 60
nodectl snapshot restore debian live-1 >/dev/null || fail "restore"
echo "DEBIAN-SNAPSHOT state=$(state) session=$(ask after-restore 120 && echo kept || echo lost)"

mkdir -p /var/lib/berth2 /run/berth2
berth-agent --config /etc/berth/agent2.toml 2>/tmp/agent2.log &
for i in $(seq 100); do [ -S /run/berth2/agent.sock ] && break; sleep 0.1; done
ask before-migration 60 || fail "the SSH session does not answer before the migration"
nodectl migrate debian --to unix:///run/berth2/agent.sock --tap tap0=tap1 >/tmp/migrate.log 2>&1 \
    || { cat /tmp/migrate.log; tail -c 3000 /tmp/agent2.log; fail migrate; }
echo "DEBIAN-MIGRATION source=$(state) destination=$(nodectl --socket /run/berth2/agent.sock --json show debian | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p' | head -1) session=$(ask after-migration 120 && echo kept || echo lost)"
kill $session 2>/dev/null

# reboot, on the second agent: the VMM ends on the FADT's reset register
# (or the i8042) and the agent brings the machine back with a new VMM.
# KERN_DEBUG on the console shows which reset the kernel tried.
N2="nodectl --socket /run/berth2/agent.sock"
state2() { $N2 --json show debian | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p' | head -1; }
pid2() { $N2 --json show debian | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -1; }
console=/var/lib/berth2/vms/debian/run/console.log
before=$($SSH cat /proc/sys/kernel/random/boot_id)
pid=$(pid2)
since=$(stat -c %s $console)
$SSH 'sudo sh -c "echo 8 > /proc/sys/kernel/printk; systemctl reboot"' || true
if boot rebooted $since; then
    after=$($SSH cat /proc/sys/kernel/random/boot_id)
    echo "DEBIAN-REBOOT state=$(state2) new_boot=$([ -n "$after" ] && [ "$after" != "$before" ] && echo yes || echo no) new_vmm=$([ "$(pid2)" != "$pid" ] && echo yes || echo no)"
else
    echo "DEBIAN-REBOOT state=$(state2) no login within the wait"
    tail -c +$(( since + 1 )) $console | tail -c 4000
    tail -c 2000 /var/lib/berth2/vms/debian/vmm.log
fi
$N2 stop debian --force >/dev/null
"#;

fn inner_host() -> InnerHost {
    let image = image_dir("debian");
    let (key, public) = ssh_key();
    let text = |dest: &str, perm, s: String| (dest.to_string(), perm, s.into_bytes());
    InnerHost {
        cpu: INNER_CPU,
        memory_mib: 4096,
        data_disk: Some(data_disk(&image)),
        files: vec![("root/.ssh/id".into(), 0o600, key)],
        texts: vec![
            text("etc/berth/agent.toml", 0o644, agent_config("")),
            text("etc/berth/agent2.toml", 0o644, agent_config("2")),
            text("etc/berth/debian.toml", 0o644, vm_spec(&public)),
            text(
                "etc/passwd",
                0o644,
                "root:x:0:0:root:/root:/bin/sh\n".into(),
            ),
            text("etc/group", 0o644, "root:x:0:\n".into()),
        ],
        programs: vec![
            ("usr/bin/berth-agent".into(), binary("berth-agent")),
            ("usr/bin/nodectl".into(), binary("nodectl")),
            (
                "usr/bin/ssh".into(),
                berth_tests::which("ssh").expect("ssh (openssh-client) on this host"),
            ),
        ],
    }
}

fn run(lifecycle: bool) -> ScenarioResult {
    eprintln!("[debian_guest] mode: Debian 12 on kvm_amd inside QEMU TCG (emulated AMD-V)");
    let scenario = Scenario {
        name: "debian",
        script: script(lifecycle),
    };
    let run = run_scenarios_on(
        &inner_host(),
        &[scenario],
        Duration::from_secs(SCENARIO_BUDGET_S as u64 + 120),
    );
    eprintln!(
        "[debian_guest] inner host run took {:?}",
        run.finished.elapsed
    );
    let saved = scratch_dir("debian-guest").join("inner-host-console.txt");
    std::fs::write(&saved, &run.finished.stdout).unwrap();
    eprintln!(
        "[debian_guest] the inner host's whole console: {}",
        saved.display()
    );
    let result = run.scenario("debian");
    for line in result.output.lines().filter(|l| l.starts_with("DEBIAN-")) {
        // Past the test harness's capture: a retry shows in a passing log.
        let _ = writeln!(std::io::stderr(), "[debian_guest] {line}");
    }
    result
}

fn value<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{out}"))
        .trim()
}

/// The first boot with cloud-init, SSH in, power-off, and a second start
/// that is not a first boot. About 7 minutes. On demand for now, like the
/// lifecycle test below: in CI a second boot's VMM was once stopped by its
/// seccomp filter with no call named, unexplained yet, and the emulated
/// host triple-faults nested guests now and then (docs/testing.md).
/// `cargo test -p berth-tests --test debian_guest -- --ignored --nocapture`
#[test]
#[ignore = "on demand until the harness's faults and a seccomp stop in CI are explained; see docs/testing.md"]
fn the_debian_cloud_image_boots_takes_its_cloud_init_and_lets_its_user_in() {
    let r = run(false);
    let out = &r.output;
    let ctx = format!("scenario {} ({} ms):\n{out}", r.name, r.ms);
    check_first_boots(out, &ctx);
    assert!(out.contains("DEBIAN-DONE"), "{ctx}");
    assert_eq!(r.exit, 0, "{ctx}");
}

/// On demand (about 15 minutes, and the emulated host's faults make a
/// whole run pass only now and then; docs/testing.md): an SSH session
/// across a live snapshot and restore and across a migration to a second
/// agent, then a guest reboot.
/// `cargo test -p berth-tests --test debian_guest -- --ignored --nocapture`
#[test]
#[ignore = "long, and the emulated AMD-V host faults too often for CI; see docs/testing.md"]
fn an_ssh_session_survives_snapshot_and_migration_and_reboot_comes_back() {
    let r = run(true);
    let out = &r.output;
    let ctx = format!("scenario {} ({} ms):\n{out}", r.name, r.ms);
    check_first_boots(out, &ctx);
    assert_eq!(
        value(out, "DEBIAN-SNAPSHOT"),
        "state=Running session=kept",
        "an SSH session open across a live snapshot and restore\n{ctx}"
    );
    assert_eq!(
        value(out, "DEBIAN-MIGRATION"),
        "source=Migrated destination=Running session=kept",
        "an SSH session open across a migration to a second agent\n{ctx}"
    );
    assert_eq!(
        value(out, "DEBIAN-REBOOT"),
        "state=Running new_boot=yes new_vmm=yes",
        "a guest reboot comes back in a new VMM\n{ctx}"
    );
    assert!(out.contains("DEBIAN-DONE"), "{ctx}");
    assert_eq!(r.exit, 0, "{ctx}");
}

fn check_first_boots(out: &str, ctx: &str) {
    assert!(!out.contains("DEBIAN-FAILED"), "{ctx}");
    assert!(
        out.contains("DEBIAN-LOGIN first"),
        "login: on the console\n{ctx}"
    );
    assert_eq!(value(out, "DEBIAN-GUEST first nproc="), "2", "{ctx}");
    let mem_kib: u64 = value(out, "DEBIAN-GUEST first MemTotal:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    // The kernel keeps its own image and reserved areas out of MemTotal.
    assert!(
        (900 * 1024..=1024 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB is within a few % of 1 GiB\n{ctx}"
    );
    assert_eq!(
        value(out, "DEBIAN-GUEST first hostname="),
        HOSTNAME,
        "{ctx}"
    );
    assert_eq!(
        value(out, "DEBIAN-GUEST first cloud-init="),
        "done",
        "{ctx}"
    );
    assert_eq!(value(out, "DEBIAN-GUEST first root="), "/dev/vda1", "{ctx}");
    assert_eq!(
        value(out, "DEBIAN-AFTER-POWEROFF state="),
        "Stopped",
        "{ctx}"
    );
    assert!(
        value(out, "DEBIAN-LAST-EXIT").contains("guest powered off"),
        "{ctx}"
    );
    let first = value(out, "DEBIAN-GUEST first instance=");
    assert!(!first.is_empty(), "{ctx}");
    assert_eq!(
        value(out, "DEBIAN-GUEST second instance="),
        first,
        "a restart is not a first boot\n{ctx}"
    );
}
