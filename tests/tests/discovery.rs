//! How a guest finds its CPUs, devices and power controls, through the
//! agent: ACPI unless the spec says legacy, a guest poweroff that ends as
//! Stopped, and accesses nothing claims counted in Stats.

use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;

async fn wait_state(c: &Clients, id: &str, want: pb::VmState) -> pb::Vm {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vm = get(c, id).await;
        if state_of(&vm) == want {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {want:?}: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_spec_chooses_acpi_or_legacy_and_get_shows_it() {
    report_mode("discovery");
    let agent = TestAgent::new("discovery");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("acpi", 2, "probe.mode=boot")).await;
    let mut legacy = probe_spec("legacy", 2, "probe.mode=boot");
    legacy.kernel.as_mut().unwrap().discovery = pb::Discovery::DISCOVERY_LEGACY.into();
    create_and_start(&c, legacy).await;
    for id in ["acpi", "legacy"] {
        wait_console(&agent, id, "PROBE done", Duration::from_secs(30));
    }
    let acpi = console_text(&agent, "acpi");
    assert!(
        acpi.contains("PROBE cpus_madt 2") && acpi.contains("PROBE cpus_mp 1 nomptable"),
        "{acpi}"
    );
    let legacy = console_text(&agent, "legacy");
    assert!(
        legacy.contains("PROBE cpus_mp 2") && legacy.contains("PROBE acpi none"),
        "{legacy}"
    );
    let kernel = |vm: pb::Vm| vm.spec.kernel.discovery.enum_value();
    assert_eq!(
        kernel(get(&c, "acpi").await),
        Ok(pb::Discovery::DISCOVERY_ACPI)
    );
    assert_eq!(
        kernel(get(&c, "legacy").await),
        Ok(pb::Discovery::DISCOVERY_LEGACY)
    );

    // A value this agent does not know is refused, not read as ACPI.
    let mut unknown = probe_spec("unknown", 1, "probe.mode=boot");
    unknown.kernel.as_mut().unwrap().discovery = protobuf::EnumOrUnknown::from_i32(7);
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(unknown),
        ..Default::default()
    };
    let (code, message) = code_of(c.vms.create(ctx(), &req).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{message}");
    assert!(message.contains("spec.kernel.discovery 7"), "{message}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_guest_poweroff_leaves_the_vm_stopped_not_crashed() {
    report_mode("discovery-poweroff");
    let agent = TestAgent::new("discovery-poweroff");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("off", 1, "probe.mode=poweroff")).await;
    let vm = wait_state(&c, "off", pb::VmState::STOPPED).await;
    assert_eq!(vm.status.last_exit, "guest powered off", "{vm:?}");
    assert!(console_text(&agent, "off").contains("PROBE poweroff port=0x600 slp_typ=5"));
}

#[tokio::test(flavor = "current_thread")]
async fn accesses_nothing_claims_read_all_ones_and_are_counted() {
    report_mode("discovery-unclaimed");
    let agent = TestAgent::new("discovery-unclaimed");
    let c = agent.clients().await;
    create_and_start(
        &c,
        probe_spec("stray", 1, "probe.mode=unclaimed probe.unclaimed_n=5"),
    )
    .await;
    // The whole line, with the probe's CRLF (a wait for its start can see
    // half of it): what the guest read, all-ones.
    wait_console(
        &agent,
        "stray",
        "PROBE unclaimed port=0xff mmio=0xffffffff n=5\r\n",
        Duration::from_secs(30),
    );
    // Five reads and five writes of each; the probe's own boot may add
    // port reads of its own (none of it touches the MMIO gap).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.vms.stats(ctx(), &vm_ref("stray")).await.expect("stats");
        if s.unclaimed_mmio_accesses == 10 && s.unclaimed_port_accesses >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters never reached 10: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state_of(&get(&c, "stray").await), pb::VmState::RUNNING);
}
