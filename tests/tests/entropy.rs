//! The entropy device through the agent: `rng` in the VM document, its
//! limit enforced and reported in Stats under "rng"/"io".

use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::common::RateLimit;
use berth_tests::contract::vm as pb;
use berth_tests::*;

#[tokio::test(flavor = "current_thread")]
async fn the_rng_serves_the_guest_within_its_limit() {
    report_mode("entropy");
    let agent = TestAgent::new("entropy");
    let c = agent.clients().await;
    let mut spec = probe_spec(
        "rng",
        1,
        "probe.mode=rng probe.rng_bytes=4096 probe.rng_hold=1",
    );
    // 4 KiB a second with a 1 KiB burst: the first 4 KiB request leaves the
    // bucket 3 KiB in debt, so the second must wait about 3/4 s for it.
    spec.rng = protobuf::MessageField::some(pb::Rng {
        limit: protobuf::MessageField::some(RateLimit {
            bytes_per_s: 4096,
            bytes_burst: 1024,
            ..Default::default()
        }),
        ..Default::default()
    });
    create_and_start(&c, spec).await;
    wait_console(&agent, "rng", "PROBE rng differ=1", Duration::from_secs(30));
    let console = console_text(&agent, "rng");
    assert!(console.contains("PROBE rng read 1 len=4096"), "{console}");

    // The probe spins after its reads; the agent samples the VMM's
    // counters in the background, so poll until the bytes are in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.vms.stats(ctx(), &vm_ref("rng")).await.expect("stats");
        let rng = s.devices.iter().find(|d| d.device == "rng");
        if let Some(d) = rng.filter(|d| d.bytes == 8192) {
            assert_eq!(d.direction, "io");
            assert!(
                d.throttled_ns > 0,
                "the second request was held back: {d:?}"
            );
            assert_eq!(d.limit.bytes_per_s, 4096, "{d:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rng device with 8192 bytes: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
