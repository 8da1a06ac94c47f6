//! `blockfence-sim`: the deterministic simulation of the lease protocol
//! (src/sim/) as a developer tool.
//!
//! - `sweep`: runs many seeds on every core, from a random start unless one is
//!   given, and prints per fault class how many seeds drew it, how many
//!   violations happened within the protocol's stated assumptions, how many
//!   needed one broken, and the rates (see `blockfence::sim::judge`). Every
//!   violation is printed as soon as its chunk is done, with the command that
//!   replays it. Exit status: 1 if any violation within the assumptions or any
//!   mutual-exclusion violation was found, else 0.
//! - `replay`: runs one seed and prints its trace and verdict.
//!
//! `scripts/sim-sweep` builds this in release mode and runs `sweep`.

use std::process::ExitCode;
use std::time::Instant;

use blockfence::sim::{self, FaultMix, Options, Summary, Verdict};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blockfence-sim",
    about = "Deterministic simulation of the blockfence lease protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run many seeds and print, per fault class, the violations within the
    /// stated assumptions and those that needed one broken.
    Sweep(SweepArgs),
    /// Run one seed; print its trace and its verdict.
    Replay(ReplayArgs),
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Fault classes, applied left to right to "all": all, none, NAME, -NAME.
    /// Example: all,-delayed_io.
    #[arg(long, default_value = "all", value_parser = parse_faults)]
    faults: String,
    /// Simulated milliseconds with faults, per seed.
    #[arg(long, default_value_t = sim::DEFAULT_CHAOS_MS)]
    chaos_ms: u64,
    /// Simulated quiet milliseconds after them (no new faults), per seed.
    #[arg(long, default_value_t = sim::DEFAULT_QUIET_MS)]
    quiet_ms: u64,
}

impl RunArgs {
    fn mix(&self) -> FaultMix {
        FaultMix::parse(&self.faults).expect("checked by clap's value parser")
    }

    fn options(&self) -> Options {
        Options {
            chaos_ms: self.chaos_ms,
            quiet_ms: self.quiet_ms,
            faults: self.mix(),
            ..Options::default()
        }
    }
}

#[derive(Args)]
struct SweepArgs {
    /// How many seeds.
    #[arg(long, default_value_t = 100_000)]
    seeds: u64,
    /// The first seed; a random one when not given (printed).
    #[arg(long)]
    start: Option<u64>,
    /// Worker threads; every core by default.
    #[arg(long)]
    threads: Option<usize>,
    /// Seeds per chunk: progress and violations are printed after each.
    #[arg(long, default_value_t = 20_000)]
    chunk: u64,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct ReplayArgs {
    /// The seed to run.
    seed: u64,
    /// Keep the stated assumptions (move what would break one back inside it).
    #[arg(long)]
    enforce_assumptions: bool,
    #[command(flatten)]
    run: RunArgs,
}

fn parse_faults(s: &str) -> Result<String, String> {
    FaultMix::parse(s).map(|_| s.to_string())
}

/// ` --faults SPEC` unless the spec is every class.
fn faults_arg(run: &RunArgs) -> String {
    if run.mix() == FaultMix::all() {
        String::new()
    } else {
        format!(" --faults {}", run.faults)
    }
}

fn replay_hint(seed: u64, run: &RunArgs) -> String {
    format!("scripts/sim-sweep replay {seed}{}", faults_arg(run))
}

fn sweep(a: &SweepArgs) -> ExitCode {
    let start = a.start.unwrap_or_else(|| rand::random::<u32>() as u64 * 16);
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = a.run.options();
    println!(
        "sweep: seeds {start}..{} ({} seeds) on {threads} threads, faults {}; \
         repeat with: scripts/sim-sweep --seeds {} --start {start}{}",
        start + a.seeds,
        a.seeds,
        a.run.faults,
        a.seeds,
        faults_arg(&a.run)
    );
    let began = Instant::now();
    let mut total = Summary {
        first_seed: start,
        ..Summary::default()
    };
    let mut done = 0;
    while done < a.seeds {
        let n = a.chunk.max(1).min(a.seeds - done);
        let s = sim::run_seeds(start + done, n, &opts, threads);
        for (seed, v) in &s.within {
            println!(
                "VIOLATION within the assumptions, seed {seed}: {v}\n  replay: {}",
                replay_hint(*seed, &a.run)
            );
        }
        for (seed, v, assumptions) in &s.needs_broken {
            let names: Vec<String> = assumptions.iter().map(|x| x.to_string()).collect();
            println!(
                "violation needing a broken assumption ({}), seed {seed}: {v}\n  replay: {}",
                names.join("; "),
                replay_hint(*seed, &a.run)
            );
        }
        total.merge(s);
        done += n;
        println!(
            "  {done}/{} seeds, {} within, {} needing a broken assumption, {:.0} s",
            a.seeds,
            total.within.len(),
            total.needs_broken.len(),
            began.elapsed().as_secs_f64()
        );
    }
    let secs = began.elapsed().as_secs_f64();
    println!("\n{}\n", total.report());
    print!("{}", total.class_table());
    println!(
        "\n{} seeds in {secs:.0} s ({:.0} seeds/s on {threads} threads)",
        total.seeds,
        total.seeds as f64 / secs.max(1e-9)
    );
    let bad = total.within.len() + total.mutual_exclusion();
    if bad > 0 {
        println!(
            "FAILED: {} within the assumptions, {} of mutual exclusion",
            total.within.len(),
            total.mutual_exclusion()
        );
        ExitCode::FAILURE
    } else {
        println!(
            "passed: no violation within the assumptions, no mutual-exclusion violation \
             ({} generation violations needed a broken assumption)",
            total.needs_broken.len()
        );
        ExitCode::SUCCESS
    }
}

fn replay(a: &ReplayArgs) -> ExitCode {
    let opts = Options {
        trace: true,
        enforce_assumptions: a.enforce_assumptions,
        ..a.run.options()
    };
    let (o, verdict) = sim::judge(a.seed, &opts);
    for line in &o.trace {
        println!("{line}");
    }
    for b in &o.broken {
        println!(
            "assumption broken at {} ms ({}): {}",
            b.at_ms, b.assumption, b.detail
        );
    }
    match verdict {
        Verdict::Clean => {
            println!("seed {}: no violation", a.seed);
            ExitCode::SUCCESS
        }
        Verdict::Within(v) => {
            println!("seed {}: VIOLATION within the assumptions: {v}", a.seed);
            ExitCode::FAILURE
        }
        Verdict::NeedsBroken { violation, .. } => {
            println!(
                "seed {}: violation that needed a broken assumption (the same seed with the \
                 assumptions kept passes; see --enforce-assumptions): {violation}",
                a.seed
            );
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Sweep(a) => sweep(&a),
        Command::Replay(a) => replay(&a),
    }
}
