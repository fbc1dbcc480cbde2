//! The API under load and abuse (issue 20): a client that holds thousands
//! of connections, or half-sends large frames, must neither lock others out
//! of the agent nor grow it nor fill its log. Everything here runs on this
//! machine's unix sockets, bounded in count and time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::common::Empty;
use berth_tests::contract::vm as pb;
use berth_tests::{report_mode, Running};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// How long a fresh client may wait for an answer while the API is abused.
const ANSWER: Duration = Duration::from_secs(2);
/// How much the agent's log may grow while it is abused.
const LOG_GROWTH: usize = 100 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/<pid>/status")
        * KIB
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `nodectl list` from a new process on a new connection, as an operator
/// would type it: it must answer within `ANSWER` and name `vm`.
fn nodectl_lists(agent: &TestAgent, vm: &str) {
    let mut cmd: Command = agent.nodectl();
    cmd.arg("list");
    let start = Instant::now();
    let (done, killed) = Running::spawn(cmd).wait_or_kill(ANSWER);
    if killed || !done.status.success() {
        let log = agent.log();
        panic!(
            "nodectl list did not answer within {ANSWER:?} ({:?}):\n{}\n--- the agent's log ends ---\n{}",
            start.elapsed(),
            done.describe(),
            &log[log.len().saturating_sub(3000)..]
        );
    }
    assert!(done.stdout.contains(vm), "{}", done.stdout);
}

/// Opens up to `n` connections without ever blocking: a connect the
/// listener's backlog cannot take fails at once and is not retried.
async fn flood(socket: &Path, n: usize) -> Vec<UnixStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match connect_nonblocking(socket).await {
            Ok(s) => held.push(s),
            // A full backlog: give the agent a moment, as a real client would.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    held
}

/// A nonblocking connect (std's blocks when the backlog is full, which
/// without a working accept loop would hang the test), then a plain socket.
async fn connect_nonblocking(socket: &Path) -> std::io::Result<UnixStream> {
    let s = tokio::net::UnixStream::connect(socket).await?.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

/// A probe VM that must not notice any of this.
async fn steady_vm(c: &Clients) -> (pb::VmState, i32) {
    let vm = get(c, "steady").await;
    (state_of(&vm), vm.status.pid)
}

/// Holding far more connections than the cap, and then more than the
/// agent's descriptors allow: the agent keeps answering new clients within
/// 2 s, holds no more than its cap, its VM is untouched, and neither its
/// memory nor its log grows with the flood.
#[tokio::test(flavor = "current_thread")]
async fn descriptor_flood_leaves_the_api_answering() {
    report_mode("api descriptor flood");
    const CAP: usize = 64;
    let agent = TestAgent::with_config("api-fd-flood", &format!("api_max_connections = {CAP}\n"));
    let pid = agent_pid(&agent);
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("steady", 1, "probe.mode=tick")).await;
    let before_vm = steady_vm(&c).await;
    assert_eq!(before_vm.0, pb::VmState::RUNNING);
    nodectl_lists(&agent, "steady");
    let (rss0, fds0, log0) = (rss_bytes(pid), open_fds(pid), agent.log().len());

    // Over the cap: the agent holds at most CAP of them.
    let held = flood(&agent.socket, 1000).await;
    eprintln!("flood 1: {} connections held by the client", held.len());
    assert!(held.len() > 2 * CAP, "the flood got in: {}", held.len());
    for _ in 0..3 {
        nodectl_lists(&agent, "steady");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Checked last, so that without a cap the test shows what the flood
    // does to the API first.
    let fds_flooded = open_fds(pid);

    // Out of descriptors: the limit under what the cap would need.
    let soft = fds0 + CAP / 2;
    let limited = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit --nofile={soft}: on the agent");
    let held2 = flood(&agent.socket, 1000).await;
    eprintln!("flood 2: {} more held, agent limit {soft}", held2.len());
    for _ in 0..5 {
        nodectl_lists(&agent, "steady");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (rss, log) = (rss_bytes(pid), agent.log().len());
    eprintln!(
        "agent RSS {} -> {} KiB, log grew {} bytes:\n{}",
        rss0 / KIB,
        rss / KIB,
        log - log0,
        &agent.log()[log0..(log0 + 2000).min(log)]
    );
    assert!(rss < rss0 + 48 * MIB, "RSS {rss0} -> {rss}");
    assert!(
        log - log0 < LOG_GROWTH,
        "the log grew {} bytes during the flood:\n{}",
        log - log0,
        &agent.log()[log0..(log0 + 4000).min(log)]
    );
    assert_eq!(steady_vm(&c).await, before_vm, "the VM did not change");
    assert!(
        fds_flooded <= fds0 + CAP + 8,
        "the agent held {fds_flooded} descriptors, {fds0} before the flood, cap {CAP}"
    );
    drop((held, held2));
    // Descriptors come back once the flood ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > fds0 + 4 {
        assert!(
            Instant::now() < deadline,
            "{} fds, {fds0} before",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodectl_lists(&agent, "steady");
}

/// A frame header announcing `len` payload bytes (a request on stream 1).
fn header(len: u32) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4..8].copy_from_slice(&1u32.to_be_bytes());
    h[8] = 1;
    h
}

/// Connects and sends the start of a frame announcing `announced` bytes
/// and `sent` bytes of it, then nothing more.
async fn half_frame(socket: &Path, announced: u32, sent: usize) -> Option<UnixStream> {
    let mut s = connect_nonblocking(socket).await.ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // A closed connection fails the write; that is an answer too.
    let _ = s.write_all(&header(announced));
    let _ = s.write_all(&vec![0x5a; sent]);
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    Some(s)
}

/// Whether the agent closed `s` (EOF or an error other than a timeout).
fn closed(mut s: &UnixStream) -> bool {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Forty connections each half-send a 4 MiB frame (1 MiB of it) and stall:
/// the agent refuses those the shared budget cannot hold at once and closes
/// the rest when the frame timeout passes; its memory comes back, a frame
/// over the size limit is refused at once, and the API answers throughout.
#[tokio::test(flavor = "current_thread")]
async fn slow_frames_are_closed_after_the_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    const N: usize = 40;
    let agent = TestAgent::with_config(
        "api-slow-frames",
        &format!("api_frame_timeout_secs = {}\n", TIMEOUT.as_secs()),
    );
    let pid = agent_pid(&agent);
    let c = agent.clients().await;
    c.node.get_node(ctx(), &Empty::default()).await.unwrap();
    let (rss0, log0) = (rss_bytes(pid), agent.log().len());

    let start = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..N {
        slow.extend(half_frame(&agent.socket, (4 << 20) - 64, MIB as usize).await);
    }
    assert_eq!(slow.len(), N, "every slow client connected");
    let oversize = half_frame(&agent.socket, 64 << 20, 16).await.unwrap();
    eprintln!("{N} half frames sent in {:?}", start.elapsed());
    // What is refused is refused at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_once = slow.iter().filter(|s| closed(s)).count();
    let oversize_at_once = closed(&oversize);
    eprintln!("agent RSS during the stall: {} KiB", rss_bytes(pid) / KIB);

    // Within the timeout: the API answers, on the old and a new connection.
    let t = Instant::now();
    let answered = tokio::time::timeout(ANSWER, c.node.get_node(ctx(), &Empty::default())).await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "GetNode during the stall: {answered:?}"
    );
    eprintln!("GetNode during the stall took {:?}", t.elapsed());
    nodectl_lists(&agent, "");

    assert!(
        at_once >= N - 16,
        "the 64 MiB budget holds 16 such frames; the rest are refused at once: {at_once}"
    );
    assert!(
        oversize_at_once,
        "a frame announcing 64 MiB is refused at once"
    );

    // The others when their time is up. A closed one reads as closed
    // again, so every connection is checked until all are.
    let deadline = start + TIMEOUT + Duration::from_secs(3);
    let mut open = N;
    while Instant::now() < deadline {
        open = slow.iter().filter(|s| !closed(s)).count();
        if open == 0 {
            break;
        }
    }
    eprintln!("all stalled connections closed after {:?}", start.elapsed());
    assert_eq!(
        open,
        0,
        "stalled connections still open {:?} after they began",
        start.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss, log) = (rss_bytes(pid), agent.log().len());
    eprintln!(
        "agent RSS {} -> {} KiB, log grew {} bytes:\n{}",
        rss0 / KIB,
        rss / KIB,
        log - log0,
        &agent.log()[log0..(log0 + 2000).min(log)]
    );
    assert!(rss < rss0 + 16 * MIB, "RSS {rss0} -> {rss}");
    assert!(log - log0 < LOG_GROWTH, "the log grew {} bytes", log - log0);
    c.node.get_node(ctx(), &Empty::default()).await.unwrap();
}

/// What the guard in front of ttrpc costs a call: 1000 GetNode calls on
/// one connection, timed. A measurement, not a check: run it by name.
#[tokio::test(flavor = "current_thread")]
#[ignore]
async fn get_node_latency() {
    let agent = TestAgent::new("api-latency");
    let c = agent.clients().await;
    for _ in 0..100 {
        c.node.get_node(ctx(), &Empty::default()).await.unwrap();
    }
    for round in 0..3 {
        let start = Instant::now();
        for _ in 0..1000 {
            c.node.get_node(ctx(), &Empty::default()).await.unwrap();
        }
        let took = start.elapsed();
        eprintln!(
            "round {round}: 1000 GetNode in {took:?}, {:?} each",
            took / 1000
        );
    }
}
