#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The operator ↔ server contract, end to end. kwok pods run no processes, so this test takes
//! the pod templates the operator actually built in the cluster (fetch Job, engine build Job,
//! serving Deployment), runs their command lines as local processes — volumes mapped to
//! temporary folders, the models served by local HTTP mirrors — for large/bf16,
//! large-turbo/fp8 and medium/bf16, and sees the cache filled, the engine built, and the
//! server report on `/v1/models` what the spec asked for (variant, precision, device, keys,
//! the variant's defaults and the names clients send). For adapters, the adapter fetch Jobs'
//! command lines (a LoRA over HTTP, a ControlNet folder on a claim) fill the directories that
//! the serving pods' `--lora` and `--controlnet` flags name.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Container;
use kube::Api;
use sd35_crds::SD35Deployment;
use sd35_e2e::{
    OperatorProcess, install_crd, kubectl_apply, repo_root, server_binary, shared_cluster,
    wait_ready,
};
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Copies the tiny model into `mirror` and writes the mirror's `sha256sums.txt`.
fn make_mirror(model: &Path, mirror: &Path) {
    let mut lines = Vec::new();
    let mut stack = vec![model.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(model).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let target = mirror.join(rel);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(&target, &bytes).unwrap();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            lines.push(format!("{hex}  {}", rel.display()));
        }
    }
    lines.sort();
    std::fs::write(mirror.join("sha256sums.txt"), lines.join("\n") + "\n").unwrap();
}

/// A static file server on loopback for the mirror, killed on drop.
struct Mirror(std::process::Child);

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_mirror(dir: &Path, port: u16) -> Mirror {
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 serves the mirror");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the mirror did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Mirror(child)
}

/// The container's command line with the pod's paths mapped onto `root` (so `/cache` is
/// `root/cache`) and the server bound to loopback on `port`.
fn local_command(container: &Container, root: &Path, port: u16) -> Command {
    let command = container.command.clone().unwrap();
    assert_eq!(command, ["sd35-server"], "pods call the server by name");
    let mut cmd = Command::new(server_binary().unwrap());
    for arg in container.args.clone().unwrap() {
        let arg = match arg.split_once('=') {
            Some((flag, value)) if value.starts_with('/') => {
                format!("{flag}={}", root.join(&value[1..]).display())
            }
            Some(("--host", _)) => "--host=127.0.0.1".to_owned(),
            Some(("--port", _)) => format!("--port={port}"),
            _ => arg,
        };
        cmd.arg(arg);
    }
    for env in container.env.clone().unwrap_or_default() {
        if let Some(value) = env.value {
            cmd.env(env.name, value);
        }
    }
    cmd
}

fn run_to_completion(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One SD35Deployment of the contract test and what its server must report.
struct Example {
    name: &'static str,
    variant: &'static str,
    precision: &'static str,
    model: &'static str,
    /// Default steps and whether classifier-free guidance is on by default.
    steps: u64,
    cfg: bool,
}

const EXAMPLES: [Example; 3] = [
    Example {
        name: "tiny-large",
        variant: "large",
        precision: "bf16",
        model: "sd35-tiny-large",
        steps: 28,
        cfg: true,
    },
    Example {
        name: "tiny-turbo",
        variant: "large-turbo",
        precision: "fp8",
        model: "sd35-tiny-large",
        steps: 4,
        cfg: false,
    },
    Example {
        name: "tiny-medium",
        variant: "medium",
        precision: "bf16",
        model: "sd35-tiny-medium",
        steps: 40,
        cfg: true,
    },
];

#[tokio::test]
async fn the_commands_the_operator_builds_fill_the_cache_build_the_engine_and_serve() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    let ns = cluster.temp_namespace("contract").await;
    let _operator = OperatorProcess::start(cluster, ns.name(), &[]).unwrap();

    let work = tempdir();
    let mut mirrors = Vec::new();
    let mut urls = std::collections::BTreeMap::new();
    for model in ["sd35-tiny-large", "sd35-tiny-medium"] {
        let dir = work.join("mirror").join(model);
        make_mirror(&repo_root().join("inference/testdata").join(model), &dir);
        let port = free_port();
        mirrors.push(serve_mirror(&dir, port));
        urls.insert(model, format!("http://127.0.0.1:{port}/"));
    }
    for e in &EXAMPLES {
        let manifest = format!(
            "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: {}\nspec:\n  \
             variant: {}\n  precision: {}\n  model: {{source: {{http: {{url: '{}'}}}}}}\n  \
             server: {{gpu: {{count: 0}}}}\n",
            e.name, e.variant, e.precision, urls[e.model]
        );
        let out = kubectl_apply(cluster, ns.name(), &manifest).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let root = work.join("pod");
    std::fs::create_dir_all(root.join("cache")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    for e in &EXAMPLES {
        check_example(&ns, e, &root).await;
    }
    drop(mirrors);
    let _ = std::fs::remove_dir_all(&work);
}

/// Runs the fetch Job's, the build Job's and the serving Deployment's own command lines for
/// one example and checks what the server reports and serves.
async fn check_example(ns: &sd35_e2e::TestNamespace, e: &Example, root: &Path) {
    let api: Api<SD35Deployment> = ns.api();
    let obj = wait_ready(&api, e.name, TIMEOUT).await.unwrap();
    let status = obj.status.unwrap();
    let (cache_key, engine_key) = (status.cache.unwrap().key, status.engine.unwrap().key);

    let jobs: Api<Job> = ns.api();
    let container = |job: Job| job.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let fetch = container(jobs.get(&format!("sd35-fetch-{cache_key}")).await.unwrap());
    let build = container(jobs.get(&format!("sd35-build-{engine_key}")).await.unwrap());
    let deployments: Api<Deployment> = ns.api();
    let serve = deployments
        .get(e.name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .clone();
    eprintln!(
        "{}: sd35-server {}",
        e.name,
        serve.args.clone().unwrap_or_default().join(" ")
    );

    run_to_completion(local_command(&fetch, root, 0), "fetch");
    let model = root.join("cache/models").join(&cache_key);
    assert!(
        model.join(sd35_contract::COMPLETE_MARKER).is_file(),
        "no completion marker in {}",
        model.display()
    );
    run_to_completion(local_command(&build, root, 0), "build-engine");
    let engine = root.join("cache/engines").join(&engine_key);
    let manifest = sd35_contract::EngineManifest::read(&engine).unwrap();
    assert_eq!(
        (manifest.variant.as_str(), manifest.precision.as_str()),
        (e.variant, e.precision)
    );
    assert_eq!(
        (
            manifest.engine_key.as_str(),
            manifest.source_cache_key.as_str()
        ),
        (engine_key.as_str(), cache_key.as_str())
    );

    let port = free_port();
    let mut server = local_command(&serve, root, port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let ready = loop {
        if let Some(status) = server.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut err).unwrap();
            panic!("{}: the server exited ({status}):\n{err}", e.name);
        }
        if get(port, "/readyz").is_some_and(|(code, _)| code == 200) {
            break true;
        }
        if started.elapsed() > TIMEOUT {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(ready, "{}: no /readyz 200 within {TIMEOUT:?}", e.name);
    let (_, body) = get(port, "/v1/models").unwrap();
    eprintln!("{}: /v1/models {body}", e.name);
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    let m = &models["data"][0];
    // What the pod serves is what the spec says, not a guess.
    assert_eq!(m["id"], e.name);
    assert_eq!(m["variant"], e.variant);
    assert_eq!(m["variant_source"], "requested");
    assert_eq!(m["precision"], e.precision);
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["engine_key"], engine_key.as_str());
    assert_eq!(m["cache_key"], cache_key.as_str());
    assert_eq!(m["defaults"]["steps"], e.steps);
    assert_eq!(m["defaults"]["classifier_free_guidance"], e.cfg);
    assert_eq!(m["warnings"], serde_json::json!([]), "{}", e.name);
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for alias in [
        "sd3.5",
        e.variant,
        &format!("stable-diffusion-3.5-{}", e.variant),
    ] {
        assert!(
            names.contains(&alias),
            "{}: {alias} not in {names:?}",
            e.name
        );
    }
    if !e.cfg {
        // A request that names nothing but the prompt gets the variant's defaults: for turbo,
        // 4 steps of one unguided pass each.
        let (code, _) = post_json(
            port,
            "/v1/txt2img",
            r#"{"prompt":"a red cube","width":32,"height":32}"#,
        )
        .unwrap();
        assert_eq!(code, 200);
        let (_, metrics) = get(port, "/metrics").unwrap();
        let steps = metrics
            .lines()
            .find_map(|l| l.strip_prefix("sd35_steps_total "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert_eq!(steps, Some(e.steps as f64), "{}: steps run", e.name);
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// `POST path` with a JSON body on loopback: the status code and body.
fn post_json(port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

/// `GET path` on loopback: the status code and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sd35-contract-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A safetensors file of zero-filled bf16 tensors (`name`, shape).
fn safetensors_file(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(std::iter::repeat_n(0u8, at));
    out
}

#[tokio::test]
async fn the_adapter_fetch_commands_the_operator_builds_cache_what_the_pods_are_told_to_load() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    let ns = cluster.temp_namespace("contract-adapters").await;
    let _operator = OperatorProcess::start(cluster, ns.name(), &[]).unwrap();

    // A LoRA on an HTTP server, and a ControlNet folder on a claim (mounted at /import).
    let work = tempdir();
    let lora = safetensors_file(&[
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            &[4, 64],
        ),
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
            &[64, 4],
        ),
    ]);
    let served = work.join("http");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("detail.safetensors"), &lora).unwrap();
    let port = free_port();
    let _mirror = serve_mirror(&served, port);
    let sha: String = Sha256::digest(&lora)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let root = work.join("pod");
    let folder = root.join("import/controlnets/canny");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("config.json"),
        br#"{"_class_name": "SD3ControlNetModel"}"#,
    )
    .unwrap();
    std::fs::write(
        folder.join("diffusion_pytorch_model.safetensors"),
        safetensors_file(&[("pos_embed.proj.weight", &[64, 16, 2, 2])]),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("cache")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let manifest = format!(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: tiny-adapters\nspec:\n  \
         variant: large\n  model: {{source: {{http: {{url: 'http://127.0.0.1:9/'}}}}}}\n  \
         server: {{gpu: {{count: 0}}}}\n  \
         adapters:\n  - {{name: detail, scale: 0.7, source: {{http: {{url: 'http://127.0.0.1:{port}/detail.safetensors', sha256: '{sha}'}}}}}}\n  \
         controlNets:\n  - {{mode: canny, source: {{pvc: {{claimName: controlnets, path: controlnets/canny}}}}}}\n"
    );
    // The claim the ControlNet comes from (its Job's pod mounts it read-only).
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: controlnets\nspec:\n  \
                 accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n";
    for yaml in [claim, manifest.as_str()] {
        let out = kubectl_apply(cluster, ns.name(), yaml).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let api: Api<SD35Deployment> = ns.api();
    let obj = wait_ready(&api, "tiny-adapters", TIMEOUT).await.unwrap();
    let adapters = obj.status.unwrap().adapters;
    assert_eq!(adapters.len(), 2);

    // Each adapter's own Job command line, run here, fills its directory.
    let jobs: Api<Job> = ns.api();
    for a in &adapters {
        let job = jobs.get(&format!("sd35-adapter-{}", a.key)).await.unwrap();
        let container = job.spec.unwrap().template.spec.unwrap().containers[0].clone();
        run_to_completion(
            local_command(&container, &root, 0),
            &format!("fetch-adapter {}", a.name),
        );
        let dir = root.join("cache/adapters").join(&a.key);
        assert!(
            dir.join(sd35_contract::COMPLETE_MARKER).is_file(),
            "no completion marker in {}",
            dir.display()
        );
    }

    // What the serving pods are told to load is what the Jobs cached.
    let deployments: Api<Deployment> = ns.api();
    let args = deployments
        .get("tiny-adapters")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    let local = |path: &str| root.join(path.trim_start_matches('/'));
    let lora_flag = args
        .iter()
        .find_map(|a| a.strip_prefix("--lora="))
        .expect("a --lora flag");
    let lora_arg: sd35_contract::LoraArg = lora_flag.parse().unwrap();
    assert_eq!(
        (lora_arg.name.as_str(), lora_arg.scale),
        ("detail", Some(0.7))
    );
    assert!(
        std::fs::read(local(&lora_arg.path.to_string_lossy())).unwrap() == lora,
        "the LoRA the pods load is not the file served"
    );
    let controlnet: sd35_contract::ControlNetArg = args
        .iter()
        .find_map(|a| a.strip_prefix("--controlnet="))
        .expect("a --controlnet flag")
        .parse()
        .unwrap();
    let dir = local(&controlnet.path.to_string_lossy());
    assert!(
        dir.join("config.json").is_file()
            && dir.join("diffusion_pytorch_model.safetensors").is_file(),
        "{} is not the ControlNet folder",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&work);
}
