//! `vmm run` boots a VM; `vmm ctl` talks to a running one over its API socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use vmm::api::{self, Request};
use vmm::config::{
    BalloonConfig, DeviceConfig, DiskConfig, NetConfig, SerialOutput, VmConfig, VsockConfig,
};
use vmm::state_roots::StateRoots;
use vmm::{vm, vmm::Machine};

#[derive(Parser)]
#[command(name = "vmm", version, about = "A minimal KVM virtual machine monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until it powers off.
    Run(Box<RunArgs>),
    /// Start a VM from a snapshot directory (memory is mapped, not copied).
    Restore(RestoreArgs),
    /// Send a command to a running VMM.
    Ctl(CtlArgs),
    /// Print a snapshot's state (checked like a restore would) as JSON, whole or one part.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long)]
    snapshot: PathBuf,
    /// Only this part, on one line.
    #[arg(long, value_parser = ["config", "vm", "vcpus", "devices"])]
    part: Option<String>,
}

/// The VMM's confinement, for `run` and `restore`.
#[derive(Args)]
struct SandboxArgs {
    /// Run without seccomp filters (for debugging: every thread may make any system call).
    #[arg(long = "no-seccomp")]
    no_seccomp: bool,
    /// Test hook: the first thread of this kind makes a forbidden call once filtered.
    #[arg(long = "seccomp-selftest", hide = true, conflicts_with = "no_seccomp")]
    seccomp_selftest: Option<vmm::seccomp::Kind>,
    /// The only directories (and what is under them) `snapshot` and `migrate` requests may
    /// name; repeatable. Without it, any.
    #[arg(long = "state-root", value_name = "DIR")]
    state_roots: Vec<PathBuf>,
}

impl SandboxArgs {
    /// Turns the filters on, before the first thread starts.
    fn enable(&self) -> Result<()> {
        if self.no_seccomp {
            tracing::warn!("seccomp filters are off (--no-seccomp)");
            return Ok(());
        }
        Ok(vmm::seccomp::enable(self.seccomp_selftest)?)
    }

    fn state_roots(&self) -> Result<StateRoots> {
        Ok(StateRoots::new(&self.state_roots)?)
    }
}

#[derive(Args)]
struct RestoreArgs {
    #[arg(
        long,
        required_unless_present = "checkpoint",
        conflicts_with = "checkpoint"
    )]
    snapshot: Option<PathBuf>,
    /// Resume from the newest usable checkpoint in DIR (docs/checkpoint.md), rolling the VM's
    /// disks back to that instant; exits 1 if none is usable.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: be the VM's standby (docs/standby.md): hold its memory as of the newest
    /// checkpoint and follow each new one, touching neither the checkpoints nor the disks, until
    /// `vmm ctl promote` (or shutdown).
    #[arg(long, conflicts_with = "paused")]
    standby: bool,
    #[arg(long = "api-socket")]
    api_socket: Option<PathBuf>,
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Stay paused until `vmm ctl resume`.
    #[arg(long)]
    paused: bool,
    /// The host's lease file, as for `run`: the guest is stopped the moment the lease lapses.
    #[arg(long, value_name = "FILE")]
    lease: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: an ELF (PVH entry if it has the note) or a bzImage.
    #[arg(long, required_unless_present = "incoming")]
    kernel: Option<PathBuf>,
    /// Be the target of a live migration through DIR on shared storage: wait for the source's
    /// state there (the VM's configuration comes from the source).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "disks", "nets", "vsock", "balloon", "rng", "max_vcpus", "max_memory_mib"])]
    incoming: Option<PathBuf>,
    /// With --incoming: give up (exit 1) if no source has handed a VM over within this time.
    #[arg(
        long = "incoming-timeout-ms",
        default_value_t = 600_000,
        requires = "incoming"
    )]
    incoming_timeout_ms: u64,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "")]
    cmdline: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// vCPU slots the guest sees (ACPI and CPUID topology), for CPUs added later; default --vcpus.
    #[arg(long = "max-vcpus")]
    max_vcpus: Option<u32>,
    #[arg(long = "memory-mib", default_value_t = 128)]
    memory_mib: u64,
    /// The most memory the VM can grow to (`ctl resize --memory-mib`), by 2 MiB blocks of a
    /// virtio-mem device; default --memory-mib (it cannot grow).
    #[arg(long = "max-memory-mib")]
    max_memory_mib: Option<u64>,
    /// Unix socket for the control API.
    #[arg(long = "api-socket")]
    api_socket: Option<PathBuf>,
    /// Console: `stdio` or `file:PATH`.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// A raw disk image (virtio-blk), `PATH[,ro]`; repeatable, the first is /dev/vda.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A virtio-net device on a tap, `tap=NAME[,mac=MAC]`; the tap is created if missing.
    #[arg(long = "net")]
    nets: Vec<String>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-balloon device; `--balloon deflate-on-oom` lets the guest deflate under pressure.
    #[arg(long, num_args = 0..=1, default_missing_value = "on", value_parser = ["on", "deflate-on-oom"])]
    balloon: Option<String>,
    /// With --balloon: ask the guest for memory statistics every N ms, so `info` shows how much
    /// of its memory the guest uses without a round trip (0: only `ctl balloon-stats` asks).
    #[arg(long = "balloon-stats-ms", default_value_t = 0, requires = "balloon")]
    balloon_stats_ms: u64,
    /// A virtio-vsock device, `cid=N,socket=PATH` (host side: see docs/vsock.md).
    #[arg(long)]
    vsock: Option<String>,
    /// The host's lease file (written by the agent): the guest is stopped the moment the lease
    /// lapses or the file cannot be read (docs/failover.md).
    #[arg(long, value_name = "FILE")]
    lease: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Args)]
struct CtlArgs {
    #[arg(long = "api-socket")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// State, configuration, vCPUs and memory.
    Info,
    Pause,
    Resume,
    /// Press the ACPI power button; force the stop after the timeout.
    Shutdown {
        #[arg(long = "timeout-ms", default_value_t = api::DEFAULT_SHUTDOWN_TIMEOUT_MS)]
        timeout_ms: u64,
    },
    /// Set the balloon's target size: how much memory the guest gives back.
    BalloonSet {
        mib: u64,
    },
    /// The balloon's size and the guest's latest memory statistics.
    BalloonStats,
    /// Change the running VM's size: vCPUs are hot-added or, once the guest ejects them, removed
    /// (up to `--max-vcpus`); memory is plugged or unplugged by virtio-mem (from the boot size up
    /// to `--max-memory-mib`). Waits for the guest; prints old, new and took_ms.
    Resize {
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long = "memory-mib")]
        memory_mib: Option<u64>,
        /// How long to wait for the guest to take or give back the vCPUs and memory (then the
        /// rest of the change is withdrawn and the error says how far the guest got).
        #[arg(long = "timeout-ms", default_value_t = api::DEFAULT_RESIZE_TIMEOUT_MS)]
        timeout_ms: u64,
    },
    /// Save the paused VM's complete state and memory to DIR.
    Snapshot {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write a checkpoint of the running VM into DIR (docs/checkpoint.md): memory, device state
    /// and its writable disks at one instant, the last two kept.
    Checkpoint {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Promote a standby (`restore --checkpoint DIR --standby`): the guest runs from the newest
    /// usable checkpoint, the disks rolled back to it (docs/standby.md).
    Promote,
    /// Live-migrate to the `vmm run --incoming DIR` waiting on the same shared directory. Prints
    /// the outcome as one JSON line.
    Migrate {
        #[arg(long)]
        dir: PathBuf,
        /// Pause no longer than this for the last copy (an estimate from measured bandwidth).
        #[arg(long = "downtime-ms", default_value_t = api::DEFAULT_DOWNTIME_MS)]
        downtime_ms: u64,
        /// Pre-copy rounds before pausing regardless.
        #[arg(long = "max-rounds", default_value_t = api::DEFAULT_MAX_ROUNDS)]
        max_rounds: u32,
        /// How long the target has to take over before the source resumes the guest itself.
        #[arg(long = "timeout-ms", default_value_t = api::DEFAULT_HANDOVER_TIMEOUT_MS)]
        timeout_ms: u64,
    },
    /// Stop a running migration; the guest keeps running here.
    MigrateCancel,
}

fn run(args: RunArgs) -> Result<i32> {
    let serial: SerialOutput = args.serial.parse()?;
    args.sandbox.enable()?;
    let roots = args.sandbox.state_roots()?;
    if let Some(l) = args.lease.clone() {
        vmm::lease::watch(l)?;
    }
    if let Some(dir) = &args.incoming {
        let wait = Duration::from_millis(args.incoming_timeout_ms);
        return incoming(dir, wait, serial, args.api_socket, roots);
    }
    let Some(kernel) = args.kernel else {
        anyhow::bail!("--kernel is required");
    };
    let devices = DeviceConfig {
        disks: args
            .disks
            .iter()
            .map(|d| d.parse::<DiskConfig>())
            .collect::<Result<_, _>>()?,
        nets: args
            .nets
            .iter()
            .map(|n| n.parse::<NetConfig>())
            .collect::<Result<_, _>>()?,
        rng: args.rng,
        balloon: args.balloon.map(|b| BalloonConfig {
            deflate_on_oom: b == "deflate-on-oom",
            stats_interval_ms: args.balloon_stats_ms,
        }),
        vsock: args.vsock.map(|v| v.parse::<VsockConfig>()).transpose()?,
    };
    let kvm = vm::open_kvm()?;
    let host_max_vcpus = kvm.get_max_vcpus() as u32;
    let config = VmConfig::new(
        kernel,
        args.initrd,
        args.cmdline,
        args.vcpus,
        args.max_vcpus,
        args.memory_mib,
        serial,
        args.api_socket,
        devices,
        host_max_vcpus,
    )?
    .with_max_memory(args.max_memory_mib)?;
    let machine = Machine::build(config, kvm)?.with_state_roots(roots);
    let outcome = machine.run();
    if outcome.exit_code == 0 {
        tracing::info!(reason = %outcome.reason, "VM stopped");
    } else {
        eprintln!("vmm: {}", outcome.reason);
    }
    Ok(outcome.exit_code)
}

/// The target side of a live migration.
fn incoming(
    dir: &std::path::Path,
    wait: Duration,
    serial: SerialOutput,
    api_socket: Option<PathBuf>,
    roots: StateRoots,
) -> Result<i32> {
    let kvm = vm::open_kvm()?;
    // The readiness line a supervisor waits for (docs/migration.md).
    eprintln!("{}{}", vmm_api::INCOMING_READY_LINE, dir.display());
    if !vmm::migrate::await_handover(dir, wait)? {
        anyhow::bail!("the source took the VM back before this target claimed it");
    }
    let machine = match Machine::restore(dir, serial, api_socket, false, kvm) {
        Ok(m) => m.with_state_roots(roots),
        Err(e) => {
            let why = format!("{e:#}");
            if let Err(g) = vmm::migrate::give_back(dir, &why) {
                tracing::error!(error = %g, "cannot give the VM back to the source");
            }
            anyhow::bail!("cannot start the migrated VM: {why}");
        }
    };
    vmm::migrate::report_resumed(dir)?;
    machine.announce();
    let outcome = machine.run();
    if outcome.exit_code != 0 {
        eprintln!("vmm: {}", outcome.reason);
    }
    Ok(outcome.exit_code)
}

fn restore(args: RestoreArgs) -> Result<i32> {
    let serial: SerialOutput = args.serial.parse()?;
    if args.standby && args.checkpoint.is_none() {
        anyhow::bail!("--standby needs --checkpoint DIR: a standby follows a VM's checkpoints");
    }
    if let (true, Some(dir)) = (args.standby, &args.checkpoint) {
        args.sandbox.enable()?;
        if let Some(l) = args.lease.clone() {
            vmm::lease::watch(l)?;
        }
        return vmm::standby::run(dir.clone(), serial, args.api_socket);
    }
    // Chosen and the disks rolled back before the filters: one thread, file work only.
    let mut discarded = Vec::new();
    let snapshot = match (&args.snapshot, &args.checkpoint) {
        (Some(s), _) => s.clone(),
        (None, Some(dir)) => {
            let chosen = vmm::checkpoint::choose_and_roll_back(dir)?;
            // The line a supervisor reads to say what the guest resumed from.
            eprintln!(
                "{}{}",
                vmm_api::CHECKPOINT_RESUMED_LINE,
                serde_json::json!({
                    "seq": chosen.meta.seq,
                    "taken_unix_ms": chosen.meta.taken_unix_ms,
                    "skipped": chosen.skipped,
                })
            );
            discarded = chosen.discarded;
            chosen.dir
        }
        (None, None) => anyhow::bail!("--snapshot or --checkpoint is needed"),
    };
    args.sandbox.enable()?;
    vmm::checkpoint::remove_later(discarded);
    let roots = args.sandbox.state_roots()?;
    if let Some(l) = args.lease.clone() {
        vmm::lease::watch(l)?;
    }
    let kvm = vm::open_kvm()?;
    let machine = Machine::restore(&snapshot, serial, args.api_socket, args.paused, kvm)?
        .with_state_roots(roots);
    let outcome = machine.run();
    if outcome.exit_code != 0 {
        eprintln!("vmm: {}", outcome.reason);
    }
    Ok(outcome.exit_code)
}

fn ctl(args: CtlArgs) -> Result<i32> {
    let client = api::Client::new(args.api_socket);
    let request = match args.command {
        CtlCommand::Info => Request::Info {},
        CtlCommand::Pause => Request::Pause {},
        CtlCommand::Resume => Request::Resume {},
        CtlCommand::Shutdown { timeout_ms } => Request::Shutdown { timeout_ms },
        CtlCommand::BalloonSet { mib } => Request::BalloonSet { mib },
        CtlCommand::BalloonStats => Request::BalloonStats {},
        CtlCommand::Resize {
            vcpus,
            memory_mib,
            timeout_ms,
        } => Request::Resize {
            vcpus,
            memory_mib,
            timeout_ms,
        },
        CtlCommand::Migrate {
            dir,
            downtime_ms,
            max_rounds,
            timeout_ms,
        } => {
            let outcome: api::MigrationOutcome = client.send(&Request::Migrate {
                dir: std::path::absolute(&dir)?,
                downtime_ms,
                max_rounds,
                timeout_ms,
            })?;
            // One JSON line, last: scripts read it.
            println!("{}", serde_json::to_string(&outcome)?);
            return Ok(i32::from(outcome.status != api::MigrationStatus::Completed));
        }
        CtlCommand::MigrateCancel => Request::MigrateCancel {},
        CtlCommand::Snapshot { dir } => Request::Snapshot {
            dir: std::path::absolute(&dir)?,
        },
        CtlCommand::Checkpoint { dir } => Request::Checkpoint {
            dir: std::path::absolute(&dir)?,
        },
        CtlCommand::Promote => Request::Promote {},
    };
    // Printed as the VMM sent it: `ctl` is a thin client, scripts read its JSON.
    let result: serde_json::Value = client.send(&request)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(0)
}

fn inspect(args: InspectArgs) -> Result<i32> {
    let state = vmm::snapshot::read_state(&args.snapshot)?;
    let v = serde_json::to_value(&state)?;
    match args.part {
        Some(p) => println!("{}", serde_json::to_string(&v[p.as_str()])?),
        None => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(0)
}

fn main() {
    // VMM_LOG=error|warn|info|debug|trace (default warn). A plain level, not a filter expression:
    // an env-filter would pull a regex engine into every VMM process.
    let level = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        // Colour only on a terminal: logs go to files and the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    // What the VMM creates (snapshot and memory files, the API and vsock sockets, the console)
    // holds guest memory or controls the VM: its owner's alone, whatever umask it was given.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    if matches!(cli.command, Command::Ctl(_) | Command::Inspect(_)) {
        // Output piped into `head` ends quietly, as for any Unix tool.
        // SAFETY: restoring the default SIGPIPE disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(a) => run(*a),
        Command::Restore(a) => restore(a),
        Command::Ctl(a) => ctl(a),
        Command::Inspect(a) => inspect(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            std::process::exit(1);
        }
    }
}
