//! Who may use the agent's API: its socket is 0660, owned by root with
//! `socket_group` as its group, so a member of that group can drive the
//! node and any other unprivileged user is refused by the kernel.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_tests::agent::TestAgent;
use berth_tests::{binary, run, Finished};

/// The unprivileged user (and its primary group) the clients run as.
const NOBODY: u32 = 65534;

/// A system group made for one test, deleted when the test ends, passed or
/// failed.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn create(name: &str) -> TempGroup {
        let out = Command::new("groupadd")
            .args(["--system", name])
            .output()
            .expect("groupadd is installed");
        assert!(
            out.status.success(),
            "groupadd --system {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The guard exists from here on, so a failed lookup still removes it.
        let mut group = TempGroup {
            name: name.to_string(),
            gid: u32::MAX,
        };
        let out = Command::new("getent")
            .args(["group", name])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        group.gid = line
            .trim()
            .split(':')
            .nth(2)
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("getent group {name}: {line:?}"));
        group
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        match Command::new("groupdel").arg(&self.name).output() {
            Ok(out) if out.status.success() => {}
            other => eprintln!("groupdel {} failed: {other:?}", self.name),
        }
    }
}

/// `program args` as uid/gid `NOBODY`, with exactly `groups` as its
/// supplementary groups.
fn as_nobody(groups: &[u32], program: &Path, args: &[&str]) -> Finished {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg(program).args(args).env_remove("BERTH_SOCKET");
    run(cmd, Duration::from_secs(30))
}

/// Adds o+x to a directory the test created.
fn let_others_through(dir: &Path) {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001)).unwrap();
}

/// nodectl where `NOBODY` can run it: the build's own if the path to it
/// lets others through, else a copy in `dir` (a directory the test owns).
fn nodectl_for_nobody(dir: &Path) -> PathBuf {
    let built = binary("nodectl");
    if as_nobody(&[], &built, &["--version"]).status.success() {
        return built;
    }
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = bin.join("nodectl");
    std::fs::copy(&built, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let check = as_nobody(&[], &copy, &["--version"]);
    assert!(
        check.status.success(),
        "uid {NOBODY} cannot run {}:\n{}",
        copy.display(),
        check.describe()
    );
    copy
}

#[test]
fn the_socket_is_0660_with_socket_group_and_refuses_non_members() {
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "this test needs root: it adds a group and runs clients as another user"
    );
    // Declared before the agent, so it is deleted after the agent is gone.
    let group = TempGroup::create(&format!("bt{}sock", std::process::id()));
    let agent =
        TestAgent::with_config("socket-access", &format!("socket_group = {:?}", group.name));

    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(
        meta.mode() & 0o777,
        0o660,
        "socket mode {:o}",
        meta.mode() & 0o7777
    );
    assert_eq!(meta.gid(), group.gid, "the socket's group is socket_group");
    assert_eq!(meta.uid(), 0, "the socket is owned by root");

    // Only permissions on the socket itself may stand between the clients
    // and the agent: the test's directory lets others through, and so must
    // every directory above it (those are not the test's to change).
    let_others_through(&agent.dir);
    for dir in agent.dir.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is mode {:o}: others cannot reach the socket below it",
            dir.display(),
            mode & 0o7777
        );
    }
    let nodectl = nodectl_for_nobody(&agent.dir);
    let socket = agent.socket.to_str().unwrap();
    let list = ["--socket", socket, "--json", "list"];

    // The member really runs as nobody, with the socket's group as its only
    // extra group: its success below is not root's.
    let uid = as_nobody(&[group.gid], Path::new("id"), &["-u"]);
    assert_eq!(uid.stdout.trim(), NOBODY.to_string(), "{}", uid.describe());
    let ids = as_nobody(&[group.gid], Path::new("id"), &["-G"]);
    assert!(ids.status.success(), "{}", ids.describe());
    let mut gids: Vec<u32> = ids
        .stdout
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    gids.sort();
    let mut want = vec![group.gid, NOBODY];
    want.sort();
    assert_eq!(gids, want, "id -G: {}", ids.stdout);

    let outsider = as_nobody(&[], &nodectl, &list);
    eprintln!(
        "[socket access] non-member: {:?}, stderr: {}",
        outsider.status,
        outsider.stderr.trim()
    );
    assert!(
        !outsider.status.success(),
        "a user outside {} must be refused:\n{}",
        group.name,
        outsider.describe()
    );
    assert!(
        outsider.stderr.contains("Permission denied (os error 13)"),
        "the refusal is EACCES on connect:\n{}",
        outsider.describe()
    );
    assert!(outsider.stdout.is_empty(), "{}", outsider.describe());

    let member = as_nobody(&[group.gid], &nodectl, &list);
    eprintln!(
        "[socket access] member: {:?}, stdout: {}",
        member.status,
        member.stdout.trim()
    );
    assert!(
        member.status.success(),
        "a member of {} may use the API:\n{}",
        group.name,
        member.describe()
    );
    let vms: serde_json::Value = serde_json::from_str(&member.stdout)
        .unwrap_or_else(|e| panic!("{e}:\n{}", member.describe()));
    assert_eq!(vms, serde_json::json!([]), "a fresh agent has no VMs");
}
