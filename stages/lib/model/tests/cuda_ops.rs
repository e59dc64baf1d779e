//! The fused GPU ops (`--features cuda`, `src/cuda.rs`) equal candle's tensor ops on the same
//! GPU, forward and backward, and a whole train step on the GPU lands where the CPU's does.
//! Without CUDA support or a GPU every test prints why and returns (nothing is checked).

use candle_core::{DType, Device, Tensor, Var};
use huse_model::fused::{DenseOp, DeviceDropout};
use huse_model::loss::{self, GraphVariant, LossConfig};
use huse_model::model::{Huse, HuseConfig, Shape, l2_normalise, l2_normalise_ops};
use huse_model::optim::{Optimizer, OptimizerConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// GPU 0, or None (with the reason printed) when this build or machine has none.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!(
                "SKIPPED (no GPU check): {}",
                if cfg!(feature = "cuda") {
                    format!("no CUDA device: {e}")
                } else {
                    "this build has no CUDA support (build with --features cuda)".into()
                }
            );
            None
        }
    }
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect()
}

fn var(n: usize, shape: (usize, usize), seed: f32, dev: &Device) -> Var {
    Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, dev).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn the_dense_layer_on_the_gpu_equals_the_tensor_ops() {
    let Some(dev) = gpu() else { return };
    dev.set_seed(7).unwrap();
    for (m, k, n) in [(3, 5, 4), (300, 200, 120), (1024, 1280, 512)] {
        for (relu, p) in [(false, 0.0), (true, 0.0), (true, 0.3), (false, 0.15)] {
            let x = var(m * k, (m, k), 0.37, &dev);
            let w = var(n * k, (n, k), 0.91, &dev);
            let b = Var::from_tensor(&Tensor::from_vec(values(n, 1.7), n, &dev).unwrap()).unwrap();
            let c = Tensor::from_vec(values(m * n, 0.23), (m, n), &dev).unwrap();
            let drop = (p > 0.0).then(|| DeviceDropout::draw(p, (m, n), &dev).unwrap());
            let fused = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), DenseOp { relu, mask: None, device_mask: drop.clone() })
                .unwrap();
            let plain =
                x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
            let plain = if relu { plain.relu().unwrap() } else { plain };
            let plain = match &drop {
                Some(d) => (plain
                    * d.u.ge(d.p as f64).unwrap().to_dtype(DType::F32).unwrap().affine(d.scale() as f64, 0.0).unwrap())
                .unwrap(),
                None => plain,
            };
            let tol = 1e-4 * (k as f32).sqrt();
            assert!(
                max_diff(&fused, &plain) < tol,
                "forward {m}x{k}x{n} relu={relu} p={p}: {}",
                max_diff(&fused, &plain)
            );
            let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("W", &w), ("b", &b)] {
                let d = max_diff(gf.get(v).unwrap(), gp.get(v).unwrap());
                assert!(d < 10.0 * tol, "d{name} {m}x{k}x{n} relu={relu} p={p}: {d}");
            }
        }
    }
}

#[test]
fn l2_normalisation_on_the_gpu_equals_the_tensor_ops() {
    let Some(dev) = gpu() else { return };
    for (rows, d) in [(1, 3), (7, 512), (1024, 512), (5, 2000)] {
        let x = var(rows * d, (rows, d), 0.71, &dev);
        let c = Tensor::from_vec(values(rows * d, 0.13), (rows, d), &dev).unwrap();
        let (f, p) = (l2_normalise(x.as_tensor()).unwrap(), l2_normalise_ops(x.as_tensor()).unwrap());
        assert!(max_diff(&f, &p) < 1e-5, "forward {rows}x{d}");
        let gf = (f * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (p * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-4, "backward {rows}x{d}");
    }
}

/// The graph-loss checks' data on `dev`: labels of 300 items in 9 classes, a class distance
/// matrix, and two sets of unit embeddings, the second a perturbation of the first (so that,
/// as in training, some image-text pairs are closer than the margin).
fn graph_data(dev: &Device) -> (Tensor, Tensor, Var, Var) {
    let (n, d, classes) = (300, 64, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let labels: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut rng, 0..classes as u32)).collect();
    let y = Tensor::from_vec(labels, n, dev).unwrap();
    let a: Vec<f32> = (0..classes * classes)
        .map(|i| if i / classes == i % classes { 0.0 } else { 0.1 + 0.8 * ((i as f32) * 0.37).sin().abs() })
        .collect();
    let a = Tensor::from_vec(a, (classes, classes), dev).unwrap();
    let raw1 = values(n * d, 0.31);
    let raw2: Vec<f32> = raw1.iter().zip(values(n * d, 0.77)).map(|(x, y)| x + 0.3 * y).collect();
    let unit = |raw: Vec<f32>| {
        Var::from_tensor(&l2_normalise_ops(&Tensor::from_vec(raw, (n, d), dev).unwrap()).unwrap()).unwrap()
    };
    (y, a, unit(raw1), unit(raw2))
}

#[test]
fn the_graph_loss_checks_data_has_pairs_inside_the_margin() {
    // Checked on the CPU (the GPU check below needs it): every variant, margin and pairing
    // of the GPU comparison has pairs that count, so a zero loss cannot pass it.
    let (y, a, e1, e2) = graph_data(&Device::Cpu);
    for variant in [GraphVariant::Paper, GraphVariant::Hinge] {
        for zeta in [0.5, 1.2] {
            for other in [&e1, &e2] {
                let v = loss::graph_loss_block_ops(e1.as_tensor(), other.as_tensor(), &y, &y, &a, zeta, variant)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(v > 0.0, "{variant:?} zeta={zeta}: no pair counts");
            }
        }
    }
}

#[test]
fn graph_and_gap_losses_on_the_gpu_equal_the_tensor_ops() {
    let Some(dev) = gpu() else { return };
    let (y, a, e1, e2) = graph_data(&dev);
    for variant in [GraphVariant::Paper, GraphVariant::Hinge] {
        for zeta in [0.5, 1.2] {
            for same in [true, false] {
                let other = if same { &e1 } else { &e2 };
                let f = loss::graph_loss_block(e1.as_tensor(), other.as_tensor(), &y, &y, &a, zeta, variant).unwrap();
                let p =
                    loss::graph_loss_block_ops(e1.as_tensor(), other.as_tensor(), &y, &y, &a, zeta, variant).unwrap();
                let what = format!("{variant:?} zeta={zeta} same={same}");
                let v = p.to_device(&Device::Cpu).unwrap().to_scalar::<f32>().unwrap();
                assert!(v != 0.0, "{what}: some pairs count");
                assert!(max_diff(&f, &p) < 1e-5 + 1e-4 * v.abs(), "{what}: value");
                let (gf, gp) = (f.backward().unwrap(), p.backward().unwrap());
                for (name, e) in [("e1", &e1), ("e2", &e2)] {
                    match (gf.get(e), gp.get(e)) {
                        (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-5, "{what}: d{name} {}", max_diff(a, b)),
                        (None, None) => {}
                        _ => panic!("{what}: d{name} on one side only"),
                    }
                }
            }
        }
    }
    let (f, p) = (
        loss::gap_loss(e1.as_tensor(), e2.as_tensor()).unwrap(),
        loss::gap_loss_ops(e1.as_tensor(), e2.as_tensor()).unwrap(),
    );
    assert!(max_diff(&f, &p) < 1e-5, "gap value");
    let (gf, gp) = (f.backward().unwrap(), p.backward().unwrap());
    for e in [&e1, &e2] {
        assert!(max_diff(gf.get(e).unwrap(), gp.get(e).unwrap()) < 1e-6, "gap gradient");
    }
}

#[test]
fn optimiser_steps_on_the_gpu_equal_the_cpu_ones() {
    let Some(dev) = gpu() else { return };
    for config in [
        OptimizerConfig::Adamw { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        OptimizerConfig::Rmsprop { lr: 1e-3, momentum: 0.9, rho: 0.99, eps: 1e-8 },
        OptimizerConfig::Rmsprop { lr: 1e-3, momentum: 0.0, rho: 0.99, eps: 1e-8 },
    ] {
        let mut params = Vec::new();
        for device in [&Device::Cpu, &dev] {
            let p = var(5000, (50, 100), 0.57, device);
            let mut opt = Optimizer::new(vec![p.clone()], config.clone()).unwrap();
            for step in 0..3 {
                let c = Tensor::from_vec(values(5000, 0.11 + step as f32), (50, 100), device).unwrap();
                let l = (p.as_tensor().sqr().unwrap() * &c).unwrap().sum_all().unwrap();
                opt.step(&l.backward().unwrap()).unwrap();
            }
            params.push(p.as_tensor().clone());
        }
        let d = max_diff(&params[0], &params[1]);
        assert!(d < 1e-5, "{config:?}: CPU and GPU parameters differ by {d}");
    }
}

#[test]
fn a_train_step_on_the_gpu_lands_where_the_cpu_one_does() {
    let Some(dev) = gpu() else { return };
    // The base shape without dropout (the devices draw different masks), 3 AdamW steps on
    // the same batch: the parameters agree within float tolerance.
    let (n, di, dt, classes) = (256, 1280, 384, 12);
    let cfg =
        HuseConfig { image_input: di, text_input: dt, classes, shape: Shape { dropout: 0.0, ..Shape::default() } };
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % classes as u32).collect();
    let a: Vec<f32> = (0..classes * classes)
        .map(|i| if i / classes == i % classes { 0.0 } else { 0.2 + 0.6 * ((i as f32) * 0.37).sin().abs() })
        .collect();
    let mut out = Vec::new();
    for device in [Device::Cpu, dev.clone()] {
        let model = Huse::new(&cfg, &mut ChaCha8Rng::seed_from_u64(5), &device).unwrap();
        let mut opt = Optimizer::new(
            model.vars(),
            OptimizerConfig::Adamw { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        )
        .unwrap();
        let xi = Tensor::from_vec(values(n * di, 0.013), (n, di), &device).unwrap().relu().unwrap();
        let xt = Tensor::from_vec(values(n * dt, 0.029), (n, dt), &device).unwrap();
        let y = Tensor::from_vec(labels.clone(), n, &device).unwrap();
        let a = Tensor::from_vec(a.clone(), (classes, classes), &device).unwrap();
        let mut losses = Vec::new();
        for _ in 0..3 {
            let (pi, pt) = (model.image.embed(&xi, None).unwrap(), model.text.embed(&xt, None).unwrap());
            let l = loss::total(
                &pi,
                &pt,
                &model.logits(&pi).unwrap(),
                &model.logits(&pt).unwrap(),
                &y,
                &a,
                &LossConfig::default(),
            )
            .unwrap();
            losses.push(l.total.to_device(&Device::Cpu).unwrap().to_scalar::<f32>().unwrap());
            opt.step(&l.total.backward().unwrap()).unwrap();
        }
        out.push((losses, model.vars().iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>()));
    }
    let ((lc, pc), (lg, pg)) = (&out[0], &out[1]);
    for (c, g) in lc.iter().zip(lg) {
        assert!((c - g).abs() < 1e-4 * c.abs().max(1.0), "losses CPU {lc:?} vs GPU {lg:?}");
    }
    for (c, g) in pc.iter().zip(pg) {
        assert!(max_diff(c, g) < 1e-4, "a parameter differs by {}", max_diff(c, g));
    }
}
