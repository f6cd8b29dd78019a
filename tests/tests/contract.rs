#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The operator ↔ server contract, end to end. kwok pods run no processes, so this test takes
//! the pod templates the operator actually built in the cluster (fetch Job, engine build Job,
//! serving Deployment), runs their command lines as local processes — volumes mapped to
//! temporary folders, the model served by a local HTTP mirror — and sees the cache filled,
//! the engine built and the server answer `/readyz`.

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

#[tokio::test]
async fn the_commands_the_operator_builds_fill_the_cache_build_the_engine_and_serve() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    let ns = cluster.temp_namespace("contract").await;
    let _operator = OperatorProcess::start(cluster, ns.name(), &[]).unwrap();

    let work = tempdir();
    let mirror_dir = work.join("mirror");
    make_mirror(
        &repo_root().join("inference/testdata/sd35-tiny-large"),
        &mirror_dir,
    );
    let port = free_port();
    let _mirror = serve_mirror(&mirror_dir, port);

    let manifest = format!(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: tiny\nspec:\n  variant: large\n  \
         model: {{source: {{http: {{url: 'http://127.0.0.1:{port}/'}}}}}}\n  server: {{gpu: {{count: 0}}}}\n"
    );
    let out = kubectl_apply(cluster, ns.name(), &manifest).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api: Api<SD35Deployment> = ns.api();
    let obj = wait_ready(&api, "tiny", TIMEOUT).await.unwrap();
    let status = obj.status.unwrap();
    let (cache_key, engine_key) = (status.cache.unwrap().key, status.engine.unwrap().key);

    let jobs: Api<Job> = ns.api();
    let container = |job: Job| job.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let fetch = container(jobs.get(&format!("sd35-fetch-{cache_key}")).await.unwrap());
    let build = container(jobs.get(&format!("sd35-build-{engine_key}")).await.unwrap());
    let deployments: Api<Deployment> = ns.api();
    let serve = deployments
        .get("tiny")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .clone();

    let root = work.join("pod");
    std::fs::create_dir_all(root.join("cache")).unwrap();
    run_to_completion(local_command(&fetch, &root, 0), "fetch");
    let model = root.join("cache/models").join(&cache_key);
    assert!(
        model.join(sd35_contract::COMPLETE_MARKER).is_file(),
        "no completion marker in {}",
        model.display()
    );
    assert!(model.join("transformer").is_dir());

    run_to_completion(local_command(&build, &root, 0), "build-engine");
    let engine = root.join("cache/engines").join(&engine_key);
    assert!(
        engine.join(sd35_contract::ENGINE_MANIFEST).is_file(),
        "no engine manifest in {}",
        engine.display()
    );

    let server_port = free_port();
    let mut server = local_command(&serve, &root, server_port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let ready = loop {
        if let Some(status) = server.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the server exited ({status}):\n{err}");
        }
        if readyz(server_port) {
            break true;
        }
        if started.elapsed() > TIMEOUT {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        ready,
        "the server did not answer /readyz within {TIMEOUT:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
}

fn readyz(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
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
