//! `meshca bench`: issuance throughput and latency over real TLS + gRPC
//! against an in-process server, next to the crypto floor measured in the
//! same run.
//!
//! The crypto floor is one core's rate of the work no implementation can
//! skip — verify the token signature and claims, parse and verify the CSR,
//! sign the leaf — multiplied by the number of cores. The ratio of measured
//! throughput to that floor says how much the server's own plumbing costs.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::api::Audiences;
use crate::authn::devtoken::{DevSigner, TokenSpec, DEV_ISSUER};
use crate::authn::jwt::{JwksSource, JwksVerifier};
use crate::authn::{Method, Verdict};
use crate::ca::store::DataDir;
use crate::cli::Output;
use crate::client;
use crate::config::{HumanDuration, ServeConfig};
use crate::identity::Workload;
use crate::proto::meshca as pb;
use crate::util::clock::SystemClock;

/// `meshca bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Concurrent clients, each on its own TLS connection.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// How long to drive load.
    #[arg(long, default_value = "10s")]
    pub duration: HumanDuration,
    /// How long to measure the crypto floor.
    #[arg(long, default_value = "3s")]
    pub floor_duration: HumanDuration,
    /// Audit log during the load: on (as `serve` runs), off, or both (two
    /// runs, to measure what the log costs).
    #[arg(long, value_enum, default_value_t)]
    pub audit: AuditMode,
    /// With `--audit both`: alternate this many off/on pairs and report the
    /// median on/off ratio (each pair's ratio is printed too), so that drift
    /// in the machine's speed does not land on one side.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// `--audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AuditMode {
    /// The audit log on.
    #[default]
    On,
    /// The audit log off.
    Off,
    /// One run with it off, then one with it on.
    Both,
}

/// The figures `meshca bench` prints.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BenchReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Cores available.
    pub cores: usize,
    /// Successful certificates.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Measured wall time of the load phase.
    pub duration_s: f64,
    /// Throughput.
    pub certificates_per_second: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Maximum latency.
    pub max_ms: f64,
    /// One core's floor rate times the cores.
    pub crypto_floor_per_second: f64,
    /// One core's floor rate.
    pub crypto_floor_per_core: f64,
    /// Throughput / floor.
    pub ratio_to_floor: f64,
    /// Whether the audit log was on for these figures.
    pub audit: bool,
    /// With `--audit both`: throughput of the run with the log off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_off_certificates_per_second: Option<f64>,
    /// With `--audit both`: throughput with the log on / with it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_throughput_ratio: Option<f64>,
    /// With `--audit both --rounds N`: the on/off ratio of each pair, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit_round_ratios: Vec<f64>,
    /// Entries in the audit log after the run (on runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_entries: Option<u64>,
    /// Bytes of `audit.db` per entry after the run (WAL folded in at
    /// shutdown): the figure for sizing the data volume (docs/audit.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_bytes_per_entry: Option<f64>,
}

/// Runs the benchmark and prints the report.
pub(crate) async fn run(args: BenchArgs) -> Result<(), String> {
    let report = match args.audit {
        AuditMode::On => measure(&args, true).await?,
        AuditMode::Off => measure(&args, false).await?,
        AuditMode::Both => audit_both(&args).await?,
    };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        ),
        Output::Table => print_table(&report),
    }
    Ok(())
}

/// `--audit both`: alternates off/on pairs and reports the median pair by
/// its on/off ratio.
async fn audit_both(args: &BenchArgs) -> Result<BenchReport, String> {
    let mut pairs = Vec::new();
    for round in 0..args.rounds.max(1) {
        let off = measure(args, false).await?;
        let on = measure(args, true).await?;
        let ratio = on.certificates_per_second / off.certificates_per_second.max(f64::MIN_POSITIVE);
        if args.rounds > 1 {
            eprintln!(
                "round {}/{}: off {:.1}/s, on {:.1}/s, on/off {ratio:.2}",
                round + 1,
                args.rounds,
                off.certificates_per_second,
                on.certificates_per_second
            );
        }
        pairs.push((ratio, off, on));
    }
    // The median pair by ratio; its figures are the ones reported.
    let ratios: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, off, mut on) = pairs.swap_remove(pairs.len() / 2);
    on.audit_off_certificates_per_second = Some(off.certificates_per_second);
    on.audit_throughput_ratio = Some(ratio);
    if ratios.len() > 1 {
        on.audit_round_ratios = ratios;
    }
    Ok(on)
}

fn print_table(report: &BenchReport) {
    println!(
        "meshca bench: {} clients over TLS for {:.1}s on {} cores",
        report.clients, report.duration_s, report.cores
    );
    println!(
        "  certificates/s        {:>10.1}",
        report.certificates_per_second
    );
    println!("  p50 latency           {:>10.2} ms", report.p50_ms);
    println!("  p99 latency           {:>10.2} ms", report.p99_ms);
    println!("  max latency           {:>10.2} ms", report.max_ms);
    println!(
        "  requests / errors     {:>10} / {}",
        report.requests, report.errors
    );
    println!(
        "  crypto floor / core   {:>10.1} /s",
        report.crypto_floor_per_core
    );
    println!(
        "  crypto floor          {:>10.1} /s",
        report.crypto_floor_per_second
    );
    println!("  ratio to floor        {:>10.2}", report.ratio_to_floor);
    println!(
        "  audit log             {:>10}",
        if report.audit { "on" } else { "off" }
    );
    if let Some(n) = report.audit_entries {
        println!("  audit entries         {n:>10}");
    }
    if let Some(b) = report.audit_bytes_per_entry {
        println!("  audit bytes/entry     {b:>10.0}");
    }
    if let (Some(off), Some(r)) = (
        report.audit_off_certificates_per_second,
        report.audit_throughput_ratio,
    ) {
        println!("  certificates/s, off   {off:>10.1}");
        println!("  on / off              {r:>10.2}");
        if !report.audit_round_ratios.is_empty() {
            let all: Vec<String> = report
                .audit_round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect();
            println!(
                "  on / off per round    {} (median reported)",
                all.join(" ")
            );
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// One client's pre-made inputs: its identity, a token, and CSRs to cycle.
type ClientInput = (Workload, String, Vec<Vec<u8>>);

/// Latencies of the successful requests, and the count of failed ones.
type LoadResult = (Vec<Duration>, u64);

/// Runs the benchmark and returns the figures.
async fn measure(args: &BenchArgs, audit: bool) -> Result<BenchReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cfg = ServeConfig::for_tests(dir.path().to_path_buf());
    // The benchmark measures the issuance path, not the abuse limiter.
    cfg.api.rate_limit = 1e9;
    cfg.api.rate_burst = u32::MAX;
    cfg.api.limits.identity_rate_limit = 1e9;
    cfg.api.limits.identity_rate_burst = u32::MAX;
    cfg.audit.audit_log = audit;
    let running = crate::server::start(cfg).await.map_err(|e| e.to_string())?;
    let data = DataDir::new(dir.path());
    let signer = DevSigner::from_pem(
        &data
            .read_key("token-signer.key")
            .map_err(|e| e.to_string())?,
    )?;
    let bundle_pem = data.bundle_pem().map_err(|e| e.to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let inputs = client_inputs(&signer, args.clients.max(1))?;
    let floor_per_core = crypto_floor(
        &signer,
        running.ca.clone(),
        &inputs[0],
        args.floor_duration.0,
    )
    .await?;

    // Load: each client on its own TLS connection, back to back.
    let addr = running.grpc_addr.to_string();
    let mut channels = Vec::new();
    for _ in 0..inputs.len() {
        channels.push(
            client::connect(&addr, &bundle_pem, &running.server_name, None)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let started = Instant::now();
    let (mut all, errors) = load(inputs, channels, started + args.duration.0).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let audit_log = running.audit.clone();
    running.shutdown().await;
    let (audit_entries, audit_bytes_per_entry) = audit_figures(audit_log.as_ref())?;
    all.sort();
    let rate = all.len() as f64 / elapsed;
    let floor = floor_per_core * cores as f64;
    Ok(BenchReport {
        clients: args.clients,
        cores,
        requests: all.len() as u64,
        errors,
        duration_s: elapsed,
        certificates_per_second: rate,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        crypto_floor_per_second: floor,
        crypto_floor_per_core: floor_per_core,
        ratio_to_floor: if floor > 0.0 { rate / floor } else { 0.0 },
        audit,
        audit_off_certificates_per_second: None,
        audit_throughput_ratio: None,
        audit_entries,
        audit_bytes_per_entry,
        audit_round_ratios: Vec::new(),
    })
}

/// Pre-made tokens and CSRs, one identity per client, so the load phase
/// measures the server and not the client's key generation.
fn client_inputs(signer: &DevSigner, clients: usize) -> Result<Vec<ClientInput>, String> {
    let audience = Audiences::default().native;
    let now = SystemTime::now();
    let mut inputs = Vec::new();
    for i in 0..clients {
        let w = Workload::new("bench", &format!("client-{i}")).map_err(|e| e.to_string())?;
        let token = signer.mint(
            &TokenSpec {
                workload: w.clone(),
                audiences: vec![audience.clone()],
                ttl: Duration::from_secs(3600),
                issuer: DEV_ISSUER.into(),
                pod: None,
            },
            now,
        )?;
        let csrs: Vec<Vec<u8>> = (0..8)
            .map(|_| client::new_key_and_csr(None).map(|(_, c)| c))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        inputs.push((w, token, csrs));
    }
    Ok(inputs)
}

/// The crypto floor: one core's rate of the unavoidable work (verify the
/// token, verify the CSR and sign the leaf), in this process.
async fn crypto_floor(
    signer: &DevSigner,
    ca: Arc<crate::ca::Authority>,
    input: &ClientInput,
    dur: Duration,
) -> Result<f64, String> {
    let verifier = JwksVerifier::new(
        JwksSource::Static(signer.jwks().to_string()),
        vec![DEV_ISSUER.into()],
        Arc::new(SystemClock),
        Method::DevKey,
    )
    .await?;
    let audience = Audiences::default().native;
    let (w, token, csrs) = input.clone();
    tokio::task::spawn_blocking(move || {
        // A private single-threaded runtime: the loop runs on one core.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            match rt.block_on(verifier.verify(&token, &audience)) {
                Verdict::Authenticated(_) => {}
                other => return Err(format!("floor: token did not verify: {other:?}")),
            }
            ca.issue(&w, &csrs[n as usize % csrs.len()], None)
                .map_err(|e| format!("floor: {e}"))?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Drives every client back to back until `deadline`; returns all
/// latencies (unsorted) and the error count.
async fn load(
    inputs: Vec<ClientInput>,
    channels: Vec<tonic::transport::Channel>,
    deadline: Instant,
) -> Result<LoadResult, String> {
    let mut tasks = Vec::new();
    for ((_, token, csrs), ch) in inputs.into_iter().zip(channels) {
        tasks.push(tokio::spawn(async move {
            let mut c = pb::identity_client::IdentityClient::new(ch);
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = c
                    .certify(pb::CertifyRequest {
                        token: token.clone(),
                        csr: csrs[i % csrs.len()].clone(),
                        requested_ttl: None,
                    })
                    .await;
                i += 1;
                match r {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())?;
        all.extend(l);
        errors += e;
    }
    Ok((all, errors))
}

/// Entries in the audit log after the run, and bytes per entry counting
/// the database plus whatever is still in the WAL (what the volume holds).
fn audit_figures(
    log: Option<&crate::audit::AuditLog>,
) -> Result<(Option<u64>, Option<f64>), String> {
    let Some(log) = log else {
        return Ok((None, None));
    };
    let n = crate::audit::store::SqliteStore::open_read_only(log.db_path())
        .and_then(|s| crate::audit::store::AuditStore::count(&s))
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok((Some(0), None));
    }
    let mut wal = log.db_path().as_os_str().to_owned();
    wal.push("-wal");
    let bytes: u64 = [log.db_path().to_path_buf(), std::path::PathBuf::from(wal)]
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    Ok((Some(n), Some(bytes as f64 / n as f64)))
}
