//! Runtimes and templates in the report: the runtime images' build times, a template's build
//! and its fully cached rebuild, `create --template` against a cold boot of the same runtime,
//! and (with `--installs`, which reaches the package index) a real `pip install` then run
//! against a restore of the snapshot taken after it, then run.

use std::time::Instant;

use base64::Engine;
use hyper::Method;
use serde_json::{json, Value};

use crate::report::{Better, Figure};
use crate::service::{id_of, Api};
use crate::{ms, push_start, say, start_once, step, BenchError};

const TEMPLATE: &str = "bench-web";
/// A small pure-Python package with one dependency, pinned.
const PIP_PACKAGE: &str = "python-dateutil==2.9.0.post0";

/// Everything this module measures; runtimes this service lacks are noted and skipped.
pub(crate) async fn measure(
    api: &Api,
    runs: u32,
    installs: bool,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<(), BenchError> {
    let images = api
        .request(Method::GET, "/images", None)
        .await
        .map_err(step("listing the images"))?;
    let offered: Vec<String> = images["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["runtime"].as_str().map(str::to_string))
        .collect();
    for image in images["images"].as_array().into_iter().flatten() {
        if let (Some(runtime), Some(build)) =
            (image["runtime"].as_str(), image["build_ms"].as_f64())
        {
            figures.push(Figure::new(
                &format!("image.{runtime}.build_ms"),
                &format!("{runtime} image build (when it was built)"),
                "ms",
                Better::Lower,
                vec![build],
            ));
        }
    }
    if offered.iter().any(|r| r == "node22") {
        template_figures(api, runs, figures).await?;
    } else {
        notes.push("template figures skipped: this service has no node22 image".into());
    }
    if installs {
        if offered.iter().any(|r| r == "python3.13") {
            install_figures(api, runs, figures).await?;
        } else {
            notes.push("install figures skipped: this service has no python3.13 image".into());
        }
    }
    Ok(())
}

/// The template: a node22 sandbox with a small HTTP server started in the background, ready
/// once it answers.
fn template_body() -> Value {
    let server = "require('http').createServer((q, s) => s.end('ok')).listen(8080)";
    json!({
        "name": TEMPLATE,
        "runtime": "node22",
        "steps": [
            {"copy": {"path": "/home/user/server.js",
                      "content_base64": base64::engine::general_purpose::STANDARD.encode(server)}},
            {"run": "setsid node server.js > server.log 2>&1 < /dev/null &"}
        ],
        "ready": {"cmd": "curl -sf http://127.0.0.1:8080/", "timeout_s": 300}
    })
}

async fn template_figures(
    api: &Api,
    runs: u32,
    figures: &mut Vec<Figure>,
) -> Result<(), BenchError> {
    say(&format!("node22 cold boot x{runs}"));
    let mut cold = Vec::new();
    for _ in 0..runs {
        let (sample, _) = start_once(api, json!({"runtime": "node22"}), false)
            .await
            .map_err(step("node22 cold boot"))?;
        cold.push(sample);
    }
    push_start(
        figures,
        "runtime.node22.cold",
        "node22 cold boot",
        &cold,
        None,
    );
    let medians = |key: &str| {
        let find = |name: String| figures.iter().find(|f| f.name == name).map(|f| f.median);
        (
            find(format!("{key}.ready_ms")),
            find(format!("{key}.first_exec_ms")),
        )
    };
    let node_cold = medians("runtime.node22.cold");

    say("template build, then its cached rebuild");
    for (name, label) in [
        (
            "template.build_ms",
            "template build (node22, 2 steps, ready check)",
        ),
        (
            "template.rebuild_cached_ms",
            "template rebuild, every step cached",
        ),
    ] {
        let t = Instant::now();
        api.request(Method::POST, "/templates", Some(&template_body()))
            .await
            .map_err(step("building the template"))?;
        figures.push(Figure::new(name, label, "ms", Better::Lower, vec![ms(t)]));
    }
    say(&format!("create --template x{runs}"));
    let mut samples = Vec::new();
    for _ in 0..runs {
        let (sample, _) = start_once(api, json!({"template": TEMPLATE}), false)
            .await
            .map_err(step("create --template"))?;
        samples.push(sample);
    }
    push_start(
        figures,
        "template.node22",
        "create --template (node22; its server already running)",
        &samples,
        Some(node_cold),
    );
    Ok(())
}

/// A python3.13 sandbox: create, `pip install`, first run; against restores of the snapshot
/// taken after the install, each with its first run.
async fn install_figures(
    api: &Api,
    runs: u32,
    figures: &mut Vec<Figure>,
) -> Result<(), BenchError> {
    say(&format!("pip install {PIP_PACKAGE}, then restores x{runs}"));
    let egress = json!({"mode": "egress"});
    let run_it = ["-c", "import dateutil; print(dateutil.__version__)"];
    let t = Instant::now();
    let sandbox = api
        .create(json!({"runtime": "python3.13", "network": egress}))
        .await
        .map_err(step("python3.13 cold boot"))?;
    let id = id_of(&sandbox).map_err(step("python3.13 cold boot"))?;
    let pip = [
        "-m",
        "pip",
        "install",
        "--user",
        "--progress-bar",
        "off",
        PIP_PACKAGE,
    ];
    api.exec(&id, "python3", &pip)
        .await
        .map_err(step("pip install"))?;
    api.exec(&id, "python3", &run_it)
        .await
        .map_err(step("running the installed package"))?;
    let installed = ms(t);
    api.snapshot(&id, json!({"name": "bench-installed", "stop": true}))
        .await
        .map_err(step("the snapshot after the install"))?;
    api.delete(&id).await.map_err(step("delete"))?;
    let mut restored = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let sandbox = api
            .create(json!({"snapshot": "bench-installed", "network": egress}))
            .await
            .map_err(step("restoring the installed snapshot"))?;
        let id = id_of(&sandbox).map_err(step("restoring the installed snapshot"))?;
        api.exec(&id, "python3", &run_it)
            .await
            .map_err(step("running the package after a restore"))?;
        restored.push(ms(t));
        api.delete(&id).await.map_err(step("delete"))?;
    }
    figures.push(Figure::new(
        "install.pip_then_run_ms",
        &format!("python3.13: create, pip install {PIP_PACKAGE}, run"),
        "ms",
        Better::Lower,
        vec![installed],
    ));
    let mut restore = Figure::new(
        "install.restore_then_run_ms",
        "python3.13: restore the snapshot taken after the install, run",
        "ms",
        Better::Lower,
        restored,
    );
    // How many times sooner than installing again.
    restore.ratio_to_cold = Some(installed / restore.median);
    figures.push(restore);
    Ok(())
}
