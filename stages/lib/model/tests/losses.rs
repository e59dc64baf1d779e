//! The losses on tiny batches computed by hand, finite-difference gradient checks, the
//! expected directions, and RMSProp against hand-computed steps.

use candle_core::{DType, Device, Tensor, Var};
use huse_model::loss::{self, GraphPairs, GraphVariant, LossConfig};
use huse_model::model::l2_normalise;
use huse_model::optim::{Optimizer, OptimizerConfig, Schedule, lr_at};

const CPU: Device = Device::Cpu;

fn t(v: &[f64], r: usize, c: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (r, c), &CPU).unwrap()
}
fn scalar(x: &Tensor) -> f64 {
    x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}
fn labels(v: &[u32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &CPU).unwrap()
}

/// phi_I = [(1,0), (0,1)], phi_T = [(0.6,0.8), (0.8,0.6)], classes [0, 1], A = [[0, .4], [.4, 0]].
fn batch() -> (Tensor, Tensor, Tensor, Tensor) {
    (t(&[1.0, 0.0, 0.0, 1.0], 2, 2), t(&[0.6, 0.8, 0.8, 0.6], 2, 2), labels(&[0, 1]), t(&[0.0, 0.4, 0.4, 0.0], 2, 2))
}

#[test]
fn gap_loss_by_hand() {
    let (pi, pt, _, _) = batch();
    // d(i0, t0) = 1 - 0.6, d(i1, t1) = 1 - 0.6: mean 0.4.
    assert!((scalar(&loss::gap_loss(&pi, &pt).unwrap()) - 0.4).abs() < 1e-12);
}

#[test]
fn graph_loss_by_hand() {
    let (pi, pt, y, a) = batch();
    // zeta 0.5, paper variant.
    // image block: d = 1 for both off-diagonal pairs: d >= zeta, sigma = 0 -> 0.
    // text block: d = 1 - 0.96 = 0.04, A = 0.4: (0.04 - 0.4)^2 = 0.1296, two pairs / 2^2 = 0.0648.
    // across block (i_m, t_n), m != n: d = 1 - 0.8 = 0.2: (0.2 - 0.4)^2 = 0.04, two pairs / 4 = 0.02.
    let within = loss::graph_loss(&pi, &pt, &y, &a, 0.5, GraphVariant::Paper, GraphPairs::Within).unwrap();
    assert!((scalar(&within) - (0.0 + 0.0648) / 2.0).abs() < 1e-12, "{}", scalar(&within));
    let across = loss::graph_loss(&pi, &pt, &y, &a, 0.5, GraphVariant::Paper, GraphPairs::Across).unwrap();
    assert!((scalar(&across) - 0.02).abs() < 1e-12);
    let all = loss::graph_loss(&pi, &pt, &y, &a, 0.5, GraphVariant::Paper, GraphPairs::All).unwrap();
    assert!((scalar(&all) - (0.0648 + 0.02) / 3.0).abs() < 1e-12);
    // hinge, zeta 0.3: every off-diagonal A = 0.4 >= zeta, so only the push term counts:
    // text 2 * (0.3 - 0.04)^2 / 4 = 0.0338; across 2 * (0.3 - 0.2)^2 / 4 = 0.005; image 0.
    let hinge = loss::graph_loss(&pi, &pt, &y, &a, 0.3, GraphVariant::Hinge, GraphPairs::All).unwrap();
    assert!((scalar(&hinge) - (0.0338 + 0.005) / 3.0).abs() < 1e-12, "{}", scalar(&hinge));
    // The paper variant switches those pairs off entirely.
    let paper = loss::graph_loss(&pi, &pt, &y, &a, 0.3, GraphVariant::Paper, GraphPairs::All).unwrap();
    assert_eq!(scalar(&paper), 0.0);
}

#[test]
fn sigma_switches_exactly_at_zeta() {
    let (_, pt, y, _) = batch();
    let d = 1.0 - (0.6 * 0.8 + 0.8 * 0.6); // the text pair's distance, as f64 computes it
    let near = t(&[0.0, 0.01, 0.01, 0.0], 2, 2);
    let at = |zeta: f64, a: &Tensor| {
        scalar(&loss::graph_loss_block(&pt, &pt, &y, &y, a, zeta, GraphVariant::Paper).unwrap())
    };
    assert!(at(d + 1e-12, &near) > 0.0, "d just below zeta: on");
    assert_eq!(at(d, &near), 0.0, "d < zeta is strict");
    assert_eq!(at(d - 1e-12, &near), 0.0);
    // ... and A < zeta is strict too.
    let edge = |v: f64| t(&[0.0, v, v, 0.0], 2, 2);
    assert_eq!(at(0.5, &edge(0.5)), 0.0);
    assert!(at(0.5, &edge(0.5 - 1e-12)) > 0.0);
}

#[test]
fn class_loss_by_hand() {
    let li = t(&[2.0, 0.0, 0.0, 2.0], 2, 2);
    let lt = t(&[0.0, 0.0, 1.0, 0.0], 2, 2);
    let ce_i = (1.0 + (-2f64).exp()).ln();
    let ce_t = (2f64.ln() + (1.0 + 1f64.exp()).ln()) / 2.0;
    let got = scalar(&loss::class_loss(&li, &lt, &labels(&[0, 1])).unwrap());
    assert!((got - (ce_i + ce_t) / 2.0).abs() < 1e-12, "{got}");
}

#[test]
fn total_weights_the_components() {
    let (pi, pt, y, a) = batch();
    let logits = t(&[1.0, 0.0, 0.0, 1.0], 2, 2);
    let cfg = LossConfig { alpha: 2.0, beta: 3.0, gamma: 5.0, zeta: 0.5, ..LossConfig::default() };
    let l = loss::total(&pi, &pt, &logits, &logits, &y, &a, &cfg).unwrap();
    let want = 2.0 * scalar(&l.class) + 3.0 * scalar(&l.graph) + 5.0 * scalar(&l.gap);
    assert!((scalar(&l.total) - want).abs() < 1e-12);
    assert!((scalar(&l.gap) - 0.4).abs() < 1e-12);
}

/// Central differences of `f` at `x` against the autograd gradient.
fn check_grad(x0: &[f64], r: usize, c: usize, f: &dyn Fn(&Tensor) -> Tensor) {
    let var = Var::from_tensor(&t(x0, r, c)).unwrap();
    let y = f(var.as_tensor());
    let g: Vec<f64> = y.backward().unwrap().get(&var).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for i in 0..x0.len() {
        let (mut up, mut dn) = (x0.to_vec(), x0.to_vec());
        up[i] += h;
        dn[i] -= h;
        let num = (scalar(&f(&t(&up, r, c))) - scalar(&f(&t(&dn, r, c)))) / (2.0 * h);
        assert!((num - g[i]).abs() < 1e-6 * (1.0 + num.abs()), "d/dx[{i}]: numeric {num} vs autograd {}", g[i]);
    }
}

#[test]
fn gradients_match_finite_differences() {
    // Raw (unnormalised) tower outputs for 3 items, 3 dims; the losses see their L2 normalisation.
    let xi = [0.9, 0.2, -0.1, 0.3, 1.1, 0.2, -0.5, 0.4, 0.8];
    let xt = [0.7, 0.5, 0.1, 0.1, 0.9, 0.6, -0.2, 0.1, 1.2];
    let y = labels(&[0, 1, 1]);
    let a = t(&[0.0, 0.3, 0.3, 0.0], 2, 2);
    let pt = l2_normalise(&t(&xt, 3, 3)).unwrap();
    check_grad(&xi, 3, 3, &|x| loss::gap_loss(&l2_normalise(x).unwrap(), &pt).unwrap());
    for (variant, zeta) in [(GraphVariant::Paper, 0.9), (GraphVariant::Hinge, 0.6)] {
        for pairs in [GraphPairs::Within, GraphPairs::Across, GraphPairs::All] {
            check_grad(&xi, 3, 3, &|x| {
                loss::graph_loss(&l2_normalise(x).unwrap(), &pt, &y, &a, zeta, variant, pairs).unwrap()
            });
        }
    }
    let w = t(&[0.5, -0.2, 0.1, -0.3, 0.4, 0.9], 2, 3);
    let logits_t = pt.matmul(&w.t().unwrap()).unwrap();
    check_grad(&xi, 3, 3, &|x| {
        loss::class_loss(&l2_normalise(x).unwrap().matmul(&w.t().unwrap()).unwrap(), &logits_t, &y).unwrap()
    });
    // Every pair inside the margin and of near classes contributes: the graph loss is live here.
    let g =
        loss::graph_loss(&l2_normalise(&t(&xi, 3, 3)).unwrap(), &pt, &y, &a, 0.9, GraphVariant::Paper, GraphPairs::All)
            .unwrap();
    assert!(scalar(&g) > 0.0);
}

#[test]
fn directions() {
    // The gap loss falls as an item's text embedding moves towards its image embedding.
    let pi = t(&[1.0, 0.0], 1, 2);
    let mut last = f64::INFINITY;
    for s in [1.0, 0.7, 0.4, 0.1, 0.0] {
        let pt = l2_normalise(&t(&[1.0, s], 1, 2)).unwrap();
        let g = scalar(&loss::gap_loss(&pi, &pt).unwrap());
        assert!(g < last, "gap must fall: {g} after {last}");
        last = g;
    }
    assert!(last.abs() < 1e-12);
    // The graph loss is zero when the distances equal A.
    // Items 0 and 1 (class 0) share u; item 2 (class 1) is v with 1 - u.v = 0.2 = A[0][1].
    let (c, s) = (0.8f64, (1.0 - 0.64f64).sqrt());
    let e = t(&[1.0, 0.0, 1.0, 0.0, c, s], 3, 2);
    let y = labels(&[0, 0, 1]);
    let a = t(&[0.0, 0.2, 0.2, 0.0], 2, 2);
    let g = loss::graph_loss(&e, &e, &y, &a, 0.5, GraphVariant::Paper, GraphPairs::All).unwrap();
    assert!(scalar(&g).abs() < 1e-12, "{}", scalar(&g));
    // ... and positive when they do not.
    let a2 = t(&[0.0, 0.4, 0.4, 0.0], 2, 2);
    assert!(scalar(&loss::graph_loss(&e, &e, &y, &a2, 0.5, GraphVariant::Paper, GraphPairs::All).unwrap()) > 0.0);
}

#[test]
fn rmsprop_matches_hand_computed_steps() {
    // loss = 2p (gradient 2), p0 = 1, lr 0.1, rho 0.99, eps 1e-8, momentum 0.9.
    let p = Var::from_tensor(&Tensor::new(&[1.0f64], &CPU).unwrap()).unwrap();
    let mut opt =
        Optimizer::new(vec![p.clone()], OptimizerConfig::Rmsprop { lr: 0.1, momentum: 0.9, rho: 0.99, eps: 1e-8 })
            .unwrap();
    let (mut v, mut buf, mut want) = (0.0f64, 0.0f64, 1.0f64);
    for _ in 0..3 {
        let grads = (p.as_tensor() * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&grads).unwrap();
        v = 0.99 * v + 0.01 * 4.0;
        buf = 0.9 * buf + 2.0 / (v.sqrt() + 1e-8);
        want -= 0.1 * buf;
        let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
    // Step 1 by hand: v = 0.04, sqrt 0.2, buf = 10, p = 1 - 0.1 * 10 = 0.
    // Step 2: v = 0.0796, buf = 9 + 2/0.28213 = 16.0888, p = -1.60888.
    // Step 3 continues the recurrences above.
    assert!((want - (-1.608_881 - 0.1 * (0.9 * 16.088_812 + 2.0 / (0.99f64 * 0.0796 + 0.04).sqrt()))).abs() < 1e-4);
}

#[test]
fn adamw_first_step_is_lr_times_sign() {
    let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &CPU).unwrap()).unwrap();
    let mut opt = Optimizer::new(
        vec![p.clone()],
        OptimizerConfig::Adamw { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
    )
    .unwrap();
    let grads =
        (p.as_tensor() * Tensor::new(&[3.0f64, -5.0], &CPU).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    opt.step(&grads).unwrap();
    let got = p.as_tensor().to_vec1::<f64>().unwrap();
    assert!((got[0] - 0.99).abs() < 1e-9 && (got[1] + 1.99).abs() < 1e-9, "{got:?}");
}

#[test]
fn fused_graph_block_equals_the_tensor_op_version_on_a_larger_batch() {
    // 300 items over 3 classes (several parallel row blocks, a ragged last one; within a
    // modality two block rows of the symmetric product, the second ragged), f32 as in
    // training, both variants, image-text block.
    let (n, dim) = (300, 8);
    let v = |s: f64| (0..n * dim).map(|i| ((i as f64 + 1.0) * s).sin()).collect::<Vec<f64>>();
    let to32 = |x: Vec<f64>| Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), (n, dim), &CPU).unwrap();
    let y = labels(&(0..n as u32).map(|i| (i * 7) % 3).collect::<Vec<_>>());
    let a = Tensor::new(&[[0.0f32, 0.3, 0.8], [0.3, 0.0, 0.6], [0.8, 0.6, 0.0]], &CPU).unwrap();
    // Image-text blocks (two tensors) and image-image blocks (one tensor in both places,
    // whose fused gradient comes through one GEMM).
    for (variant, zeta, same) in [
        (GraphVariant::Paper, 0.9, false),
        (GraphVariant::Hinge, 0.7, false),
        (GraphVariant::Paper, 0.9, true),
        (GraphVariant::Hinge, 0.7, true),
    ] {
        let vi = Var::from_tensor(&to32(v(0.37))).unwrap();
        let e1 = l2_normalise(vi.as_tensor()).unwrap();
        let e2 = if same { e1.clone() } else { l2_normalise(&to32(v(0.91))).unwrap() };
        let fused = loss::graph_loss_block(&e1, &e2, &y, &y, &a, zeta, variant).unwrap();
        let ops = loss::graph_loss_block_ops(&e1, &e2, &y, &y, &a, zeta, variant).unwrap();
        let (f, o) = (fused.to_scalar::<f32>().unwrap(), ops.to_scalar::<f32>().unwrap());
        assert!(f > 0.0 && (f - o).abs() < 1e-5 * o.abs().max(1e-3), "{variant:?} same={same}: {f} vs {o}");
        let gf: Vec<f32> = fused.backward().unwrap().get(&vi).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let go: Vec<f32> = ops.backward().unwrap().get(&vi).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let scale = go.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0);
        for (a, b) in gf.iter().zip(&go) {
            assert!((a - b).abs() < 1e-4 * scale, "{variant:?} same={same}: {a} vs {b}");
        }
    }
}

#[test]
fn fused_cpu_steps_match_an_f64_reference() {
    // f32 vars on the CPU take the fused in-place path (chunked over threads): 40,000
    // elements, gradient c_i = sin(i), 3 steps of each optimiser, against the recurrences in f64.
    let n = 40_000;
    let c: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    let p0: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
    let configs = [
        OptimizerConfig::Adamw { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 },
        OptimizerConfig::Rmsprop { lr: 0.01, momentum: 0.9, rho: 0.99, eps: 1e-8 },
        OptimizerConfig::Rmsprop { lr: 0.01, momentum: 0.0, rho: 0.9, eps: 1e-8 },
    ];
    for config in configs {
        let to32 = |v: &[f64]| Tensor::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), &CPU).unwrap();
        let p = Var::from_tensor(&to32(&p0)).unwrap();
        let cw = to32(&c);
        let mut opt = Optimizer::new(vec![p.clone()], config.clone()).unwrap();
        let (mut want, mut a, mut b) = (p0.clone(), vec![0.0f64; n], vec![0.0f64; n]);
        for t in 1..=3 {
            let grads = (p.as_tensor() * &cw).unwrap().sum_all().unwrap().backward().unwrap();
            opt.step(&grads).unwrap();
            for i in 0..n {
                let g = c[i];
                match config {
                    OptimizerConfig::Adamw { lr, beta1, beta2, eps, weight_decay } => {
                        a[i] = beta1 * a[i] + (1.0 - beta1) * g;
                        b[i] = beta2 * b[i] + (1.0 - beta2) * g * g;
                        let (mh, vh) = (a[i] / (1.0 - beta1.powi(t)), b[i] / (1.0 - beta2.powi(t)));
                        want[i] = want[i] * (1.0 - lr * weight_decay) - lr * mh / (vh.sqrt() + eps);
                    }
                    OptimizerConfig::Rmsprop { lr, momentum, rho, eps } => {
                        a[i] = rho * a[i] + (1.0 - rho) * g * g;
                        let step = g / (a[i].sqrt() + eps);
                        b[i] = momentum * b[i] + step;
                        want[i] -= lr * if momentum > 0.0 { b[i] } else { step };
                    }
                }
            }
            let got = p.as_tensor().to_vec1::<f32>().unwrap();
            let worst = got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(worst < 2e-6, "{config:?} step {t}: max abs error {worst}");
        }
    }
}

#[test]
fn schedules() {
    assert_eq!(lr_at(Schedule::Constant, 0.1, 5, 10, 0), 0.1);
    assert!((lr_at(Schedule::Constant, 0.1, 0, 10, 4) - 0.025).abs() < 1e-12);
    assert!((lr_at(Schedule::Cosine, 0.1, 4, 14, 4) - 0.1).abs() < 1e-12);
    assert!((lr_at(Schedule::Cosine, 0.1, 9, 14, 4) - 0.05).abs() < 1e-12);
    assert!(lr_at(Schedule::Cosine, 0.1, 14, 14, 4).abs() < 1e-12);
}

#[test]
fn fused_graph_block_equals_the_tensor_op_version() {
    // Random unit embeddings, mixed labels, values and gradients agree for both variants.
    let xi = [0.9, 0.2, -0.1, 0.3, 1.1, 0.2, -0.5, 0.4, 0.8, 0.1, -0.3, 0.6];
    let xt = [0.7, 0.5, 0.1, 0.1, 0.9, 0.6, -0.2, 0.1, 1.2, 0.3, 0.3, 0.3];
    let y = labels(&[0, 1, 1, 0]);
    let a = t(&[0.0, 0.3, 0.3, 0.0], 2, 2);
    for (variant, zeta) in [(GraphVariant::Paper, 0.9), (GraphVariant::Hinge, 0.5), (GraphVariant::Hinge, 0.2)] {
        let vi = Var::from_tensor(&t(&xi, 4, 3)).unwrap();
        let e1 = l2_normalise(vi.as_tensor()).unwrap();
        let e2 = l2_normalise(&t(&xt, 4, 3)).unwrap();
        let fused = loss::graph_loss_block(&e1, &e2, &y, &y, &a, zeta, variant).unwrap();
        let ops = loss::graph_loss_block_ops(&e1, &e2, &y, &y, &a, zeta, variant).unwrap();
        assert!((scalar(&fused) - scalar(&ops)).abs() < 1e-12, "{variant:?}: {} vs {}", scalar(&fused), scalar(&ops));
        let gf: Vec<f64> = fused.backward().unwrap().get(&vi).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let go: Vec<f64> = ops.backward().unwrap().get(&vi).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in gf.iter().zip(&go) {
            assert!((a - b).abs() < 1e-12, "{variant:?}: {gf:?} vs {go:?}");
        }
    }
}

/// Deterministic image and text variables (n x dim, of `dtype`) and their L2-normalised rows.
fn embedding_pair(n: usize, dim: usize, dtype: DType) -> (Var, Var, Tensor, Tensor) {
    let v = |s: f64| (0..n * dim).map(|i| ((i as f64 + 1.0) * s).sin()).collect::<Vec<f64>>();
    let vi = Var::from_tensor(&t(&v(0.37), n, dim).to_dtype(dtype).unwrap()).unwrap();
    let vt = Var::from_tensor(&t(&v(0.91), n, dim).to_dtype(dtype).unwrap()).unwrap();
    let (pi, pt) = (l2_normalise(vi.as_tensor()).unwrap(), l2_normalise(vt.as_tensor()).unwrap());
    (vi, vt, pi, pt)
}

/// The gradient of `var` in `store`, flat, as f64.
fn grad_of(store: &candle_core::backprop::GradStore, var: &Var) -> Vec<f64> {
    store.get(var).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// The CPU gap-loss op equals the tensor-op version, value and both gradients, in f32 (as in
/// training) and f64, for batches of one row, of several parallel row blocks with a ragged
/// last one, and with row widths off the eight-lane sums; a constant argument gets no gradient.
#[test]
fn fused_gap_loss_equals_the_tensor_op_version() {
    for (n, dim) in [(1, 3), (70, 13), (300, 64)] {
        for dtype in [DType::F32, DType::F64] {
            let (vi, vt, pi, pt) = embedding_pair(n, dim, dtype);
            let fused = loss::gap_loss(&pi, &pt).unwrap();
            let ops = loss::gap_loss_ops(&pi, &pt).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            assert!(
                (scalar(&fused) - scalar(&ops)).abs() < tol,
                "{n} x {dim} {dtype:?}: {} vs {}",
                scalar(&fused),
                scalar(&ops)
            );
            let (gf, go) = (fused.backward().unwrap(), ops.backward().unwrap());
            for var in [&vi, &vt] {
                let (a, b) = (grad_of(&gf, var), grad_of(&go, var));
                let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
                assert!(scale > 0.0);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < tol * scale, "{n} x {dim} {dtype:?}: {x} vs {y}");
                }
            }
        }
    }
    // Against a constant text embedding: only the image side gets a gradient.
    let vi = Var::from_tensor(&t(&[0.6, 0.8, 1.0, 0.0], 2, 2)).unwrap();
    let pt = t(&[1.0, 0.0, 0.0, 1.0], 2, 2);
    let g = loss::gap_loss(vi.as_tensor(), &pt).unwrap().backward().unwrap();
    // d/dphi_I = -phi_T / N.
    assert_eq!(g.get(&vi).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![-0.5, 0.0, 0.0, -0.5]);
    assert!(g.get_id(pt.id()).is_none());
}

/// Three orthogonal pairs (phi_I = phi_T = the unit vectors): S = I, so every row and column
/// is one logit of 1/tau among two of 0: each cross-entropy is ln(e^(1/tau) + 2) - 1/tau.
#[test]
fn contrastive_loss_by_hand() {
    let e = t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, 3);
    for tau in [1.0f64, 0.5] {
        let want = ((1.0 / tau).exp() + 2.0).ln() - 1.0 / tau;
        for got in [loss::contrastive_loss(&e, &e, tau).unwrap(), loss::contrastive_loss_ops(&e, &e, tau).unwrap()] {
            assert!((scalar(&got) - want).abs() < 1e-12, "tau {tau}: {} vs {want}", scalar(&got));
        }
    }
    // Texts 0 and 1 swapped: rows and columns 0 and 1 hold one logit 2 (tau 0.5), but on
    // the wrong pair, so their own logit is 0: ln(e^2 + 2) each; row and column 2 as before.
    let swapped = t(&[0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 3, 3);
    let lse = (2f64.exp() + 2.0).ln();
    let want = (2.0 * lse + (lse - 2.0)) / 3.0;
    for got in
        [loss::contrastive_loss(&e, &swapped, 0.5).unwrap(), loss::contrastive_loss_ops(&e, &swapped, 0.5).unwrap()]
    {
        assert!((scalar(&got) - want).abs() < 1e-12, "{} vs {want}", scalar(&got));
    }
}

#[test]
fn the_contrastive_loss_gradients_match_finite_differences() {
    let xi = [0.9, 0.2, -0.1, 0.3, 1.1, 0.2, -0.5, 0.4, 0.8];
    let xt = [0.7, 0.5, 0.1, 0.1, 0.9, 0.6, -0.2, 0.1, 1.2];
    let (pi, pt) = (l2_normalise(&t(&xi, 3, 3)).unwrap(), l2_normalise(&t(&xt, 3, 3)).unwrap());
    for tau in [0.07, 1.0] {
        check_grad(&xi, 3, 3, &|x| loss::contrastive_loss(&l2_normalise(x).unwrap(), &pt, tau).unwrap());
        check_grad(&xt, 3, 3, &|x| loss::contrastive_loss(&pi, &l2_normalise(x).unwrap(), tau).unwrap());
        check_grad(&xi, 3, 3, &|x| loss::contrastive_loss_ops(&l2_normalise(x).unwrap(), &pt, tau).unwrap());
    }
}

/// A learned temperature: the value equals the fixed-temperature term at tau = 1/exp(s), and
/// the gradients by the log-scale and by the embeddings match finite differences.
#[test]
fn the_learned_temperature_matches_the_fixed_one_and_finite_differences() {
    let xi = [0.9, 0.2, -0.1, 0.3, 1.1, 0.2, -0.5, 0.4, 0.8];
    let xt = [0.7, 0.5, 0.1, 0.1, 0.9, 0.6, -0.2, 0.1, 1.2];
    let (pi, pt) = (l2_normalise(&t(&xi, 3, 3)).unwrap(), l2_normalise(&t(&xt, 3, 3)).unwrap());
    for s in [0.0, (1.0f64 / 0.07).ln(), 4.6] {
        let fixed = scalar(&loss::contrastive_loss(&pi, &pt, 1.0 / s.exp()).unwrap());
        let learned = scalar(&loss::contrastive_loss_scaled(&pi, &pt, &t(&[s], 1, 1)).unwrap());
        assert!((fixed - learned).abs() < 1e-12 * (1.0 + fixed), "s = {s}: {fixed} vs {learned}");
        check_grad(&[s], 1, 1, &|x| loss::contrastive_loss_scaled(&pi, &pt, x).unwrap());
        let ls = t(&[s], 1, 1);
        check_grad(&xi, 3, 3, &|x| loss::contrastive_loss_scaled(&l2_normalise(x).unwrap(), &pt, &ls).unwrap());
    }
    // In the total, the scale's gradient is delta times the term's.
    let (y, a) = (labels(&[0, 1, 0]), t(&[0.0, 0.5, 0.5, 0.0], 2, 2));
    let logits = t(&[0.1, 0.2, 0.3, 0.0, -0.1, 0.4], 3, 2);
    let cfg = LossConfig { delta: 0.5, learn_tau: true, ..LossConfig::default() };
    let v = Var::from_tensor(&t(&[3.0], 1, 1)).unwrap();
    let l = loss::total_scaled(&pi, &pt, &logits, &logits, &y, &a, &cfg, Some(v.as_tensor())).unwrap();
    let g = grad_of(&l.total.backward().unwrap(), &v)[0];
    let alone = loss::contrastive_loss_scaled(&pi, &pt, v.as_tensor()).unwrap();
    let g1 = grad_of(&alone.backward().unwrap(), &v)[0];
    assert!(g1 != 0.0 && (g - 0.5 * g1).abs() < 1e-12, "{g} vs 0.5 x {g1}");
}

/// The CPU op equals the tensor-op version, value and both gradients, f32 and f64, from one
/// pair to a batch larger than a GEMM block.
#[test]
fn fused_contrastive_loss_equals_the_tensor_op_version() {
    for (n, dim) in [(1, 3), (37, 13), (300, 64)] {
        for dtype in [DType::F32, DType::F64] {
            let (vi, vt, pi, pt) = embedding_pair(n, dim, dtype);
            // tau 0.05: one shift for all logits; 0.001: logits up to 1000, each row and column
            // shifted by its own maximum.
            let tau = if n == 37 { 0.001 } else { 0.05 };
            let fused = loss::contrastive_loss(&pi, &pt, tau).unwrap();
            let ops = loss::contrastive_loss_ops(&pi, &pt, tau).unwrap();
            let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
            let (a, b) = (scalar(&fused), scalar(&ops));
            assert!((a - b).abs() < tol * b.abs().max(1.0), "{n} x {dim} {dtype:?}: {a} vs {b}");
            let (gf, go) = (fused.backward().unwrap(), ops.backward().unwrap());
            for var in [&vi, &vt] {
                let (a, b) = (grad_of(&gf, var), grad_of(&go, var));
                let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
                assert!(n == 1 || scale > 0.0, "{n} x {dim}: no gradient");
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= tol * scale.max(1e-30), "{n} x {dim} {dtype:?}: {x} vs {y}");
                }
            }
        }
    }
}

#[test]
fn delta_adds_the_contrastive_term_and_zero_leaves_it_out() {
    let (pi, pt, y, a) = batch();
    let logits = t(&[1.0, 0.0, 0.0, 1.0], 2, 2);
    let paper = loss::total(&pi, &pt, &logits, &logits, &y, &a, &LossConfig::default()).unwrap();
    assert_eq!(scalar(&paper.contrastive), 0.0);
    let cfg = LossConfig { delta: 2.0, tau: 0.1, ..LossConfig::default() };
    let l = loss::total(&pi, &pt, &logits, &logits, &y, &a, &cfg).unwrap();
    let c = scalar(&loss::contrastive_loss(&pi, &pt, 0.1).unwrap());
    assert!(c > 0.0 && (scalar(&l.contrastive) - c).abs() < 1e-12);
    assert!((scalar(&l.total) - scalar(&paper.total) - 2.0 * c).abs() < 1e-12);
}
