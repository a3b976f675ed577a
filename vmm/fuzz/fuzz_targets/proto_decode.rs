//! What vimd and the agent decode from the queue (`Versioned::decode_checked`): host commands,
//! heartbeats, host events, jobs and lease renewals; and the enums' names as they come back
//! from the database. Any bytes: a message or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vim_proto::{
    EventKind, Heartbeat, HostCommand, HostEvent, Job, LeaseRenewal, Versioned, VmState,
};

fuzz_target!(|data: &[u8]| {
    let _ = HostCommand::decode_checked(data);
    let _ = Heartbeat::decode_checked(data);
    if let Ok(ev) = HostEvent::decode_checked(data) {
        // What vimd asks of every event before trusting it.
        let _ = ev.kind().from_agent();
        if let Some(vm) = &ev.vm {
            let _ = vm.state().reportable();
        }
    }
    let _ = Job::decode_checked(data);
    let _ = LeaseRenewal::decode_checked(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<EventKind>();
        let _ = s.parse::<VmState>();
        let _ = vim_proto::check_id("id", s);
        let _ = vim_proto::parse_lease_description(s);
    }
});
