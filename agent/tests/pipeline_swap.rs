//! A model swap during a stream of captures, through the library's `Agent` and its `ModelSlot`.
//!
//! Micrographs are dropped into the watched folder one by one while the test swaps a second model in
//! half-way. Every image must get a mask, none may fail, both models must have been used, and each
//! mask must be exactly what the model named in its journal entry predicts: an image in flight
//! finishes on the model it started with, never on a mix.

use std::path::Path;
use std::time::Duration;

use microfed::mask::Mask;
use microfed::micrograph::{Micrograph, Normalisation};
use microfed::model::onnx;
use microfed::model::runtime::Segmenter;
use microfed::pipeline::config::PipelineConfig;
use microfed::pipeline::tiling;
use microfed::pipeline::{Agent, LogPublisher};

fn export(path: &Path, seed: u64) {
    let p = microfed_kernels::unet::Params::init(2, seed).unwrap();
    onnx::save(&onnx::export(&p, &vec![]).unwrap(), path).unwrap();
}

fn png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x * 7 + y * 13 + seed * 31) % 251) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn a_swap_mid_stream_loses_nothing_and_never_mixes_models() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b) = (root.join("a.onnx"), root.join("b.onnx"));
    export(&a, 1);
    export(&b, 2);
    let text = format!(
        "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
         [model]\npath = \"{}\"\nreload_on_change = false\nthreads = 1\n\
         [tiling]\ntile = 64\noverlap = 16\n[capture]\nsettle_ms = 50\n\
         [queues]\ncaptured = 1\ndecoded = 1\nsegmented = 1\nwritten = 1\n[status]\ninterval_s = 1\n",
        a.display()
    );
    std::fs::write(root.join("agent.toml"), text).unwrap();
    let config = PipelineConfig::load(&root.join("agent.toml")).unwrap();
    let agent = Agent::new(config).unwrap();
    let slot = agent.model_slot();
    let stats = agent.stats();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = rt.spawn(agent.run(LogPublisher, async {
        let _ = stop_rx.await;
    }));

    let n = 12;
    for i in 0..n {
        // Written under a temporary name and renamed in, as careful acquisition software does.
        let tmp_name = root.join("in").join(format!(".img{i:02}.png.part"));
        std::fs::write(&tmp_name, png(80, 72, i)).unwrap();
        std::fs::rename(&tmp_name, root.join("in").join(format!("img{i:02}.png"))).unwrap();
        if i == n / 2 {
            let new = Segmenter::load(&b).unwrap();
            assert_eq!(slot.swap(new).unwrap(), 1);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let journal = root.join("out/journal.jsonl");
    let all_done = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::read_to_string(&journal)
            .map(|t| t.lines().count() == n as usize)
            .unwrap_or(false)
    });
    stop_tx.send(()).unwrap();
    let summary = rt.block_on(run).unwrap().unwrap();
    assert!(all_done, "status: {}", stats.status());
    assert_eq!(summary.segmented, n as u64);
    assert_eq!(summary.failed, 0, "{:?}", summary.failures);

    let models = [Segmenter::load(&a).unwrap(), Segmenter::load(&b).unwrap()];
    let mut used = [0; 2];
    for line in std::fs::read_to_string(&journal).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let file = e["file"].as_str().unwrap();
        let model = e["model"].as_str().unwrap();
        let g = usize::from(model.ends_with("(generation 1)"));
        used[g] += 1;
        let stem = file.trim_end_matches(".png");
        let mask = Mask::load(&root.join("out").join(format!("{stem}.mask.png"))).unwrap();
        let i: u32 = stem[3..].parse().unwrap();
        let img = Micrograph::decode(&png(80, 72, i), Path::new(file), &Normalisation::default())
            .unwrap();
        let expect = tiling::segment_logits(
            &models[g],
            &img,
            64,
            16,
            1,
            &tract_linalg::multithread::Executor::SingleThread,
        )
        .unwrap()
        .to_mask()
        .unwrap();
        assert_eq!(mask, expect, "{file}: mask is not {model}'s prediction");
    }
    assert!(
        used[0] > 0 && used[1] > 0,
        "both models must have run: {used:?}"
    );
}
