//! The fused CPU dense layer equals the plain tensor ops, forward and backward.

use candle_core::{Device, Tensor, Var};
use huse_model::fused::DenseOp;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn fused_dense_equals_tensor_ops() {
    let dev = Device::Cpu;
    // 70 x 300 inputs into 40 units: big enough for the threaded GEMM path, with negative
    // pre-activations so the ReLU mask matters.
    // 300 x 120 outputs span several chunks of the parallel element-wise passes.
    for (m, k, n) in [(3, 5, 4), (70, 300, 40), (300, 200, 120)] {
        for (relu, dropout) in [(false, false), (true, false), (true, true), (false, true)] {
            let x = Var::from_tensor(&Tensor::from_vec(values(m * k, 0.37), (m, k), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::from_vec(values(n * k, 0.91), (n, k), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::from_vec(values(n, 1.7), n, &dev).unwrap()).unwrap();
            // A loss that weights every output differently.
            let c = Tensor::from_vec(values(m * n, 0.23), (m, n), &dev).unwrap();
            // A dropout mask with p = 0.3 (every third unit dropped, kept ones scaled by 1/0.7).
            let mask: Option<Vec<f32>> =
                dropout.then(|| (0..m * n).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 / 0.7 }).collect());
            let fused = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), DenseOp { relu, mask: mask.clone(), device_mask: None })
                .unwrap();
            let plain =
                x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
            let plain = if relu { plain.relu().unwrap() } else { plain };
            let plain = match mask {
                Some(k) => (plain * Tensor::from_vec(k, (m, n), &dev).unwrap()).unwrap(),
                None => plain,
            };
            if relu && !dropout {
                let zeros =
                    plain.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|v| **v == 0.0).count();
                assert!(zeros > 0 && zeros < m * n, "the mask should cut some units: {zeros}");
            }
            assert!(max_diff(&fused, &plain) < 1e-4, "forward {m}x{k}x{n} relu={relu} dropout={dropout}");
            let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("W", &w), ("b", &b)] {
                let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert_eq!(a.shape(), b.shape());
                assert!(max_diff(a, b) < 1e-3, "d{name} {m}x{k}x{n} relu={relu} dropout={dropout}: {}", max_diff(a, b));
            }
        }
    }
}

#[test]
fn fused_dense_skips_the_input_gradient_of_constants() {
    // Features are constants: no gradient is made for them.
    let dev = Device::Cpu;
    let x = Tensor::from_vec(values(6, 0.5), (2, 3), &dev).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(values(12, 0.3), (4, 3), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap()).unwrap();
    let g = x
        .apply_op3(w.as_tensor(), b.as_tensor(), DenseOp { relu: true, mask: None, device_mask: None })
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&x).is_none() && g.get(&w).is_some());
}

#[test]
fn sparse_first_layer_equals_the_dense_layer_on_the_concatenated_input() {
    use huse_model::fused::SparseDenseOp;
    let dev = Device::Cpu;
    // 40 rows, 30 dense + 50 sparse columns, 24 units; rows with 0..4 non-zeros, columns shared
    // by several rows.
    let (m, d, v, n) = (40, 30, 50, 24);
    let (mut rows, mut cols, mut vals) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..m {
        for e in 0..(r % 5) {
            rows.push(r as u32);
            cols.push((d + (r * 7 + e * 13) % v) as u32);
            vals.push(0.3 + 0.1 * e as f32 - 0.02 * r as f32);
        }
    }
    let mut sparse = vec![0f32; m * v];
    for ((&r, &c), &x) in rows.iter().zip(&cols).zip(&vals) {
        sparse[r as usize * v + c as usize - d] += x;
    }
    let x = Tensor::from_vec(values(m * d, 0.37), (m, d), &dev).unwrap();
    let full = Tensor::cat(&[&x, &Tensor::from_vec(sparse, (m, v), &dev).unwrap()], 1).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(values(n * (d + v), 0.71), (n, d + v), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(values(n, 1.3), n, &dev).unwrap()).unwrap();
    let c = Tensor::from_vec(values(m * n, 0.29), (m, n), &dev).unwrap();
    for (relu, dropout) in [(false, false), (true, false), (true, true)] {
        let mask: Option<Vec<f32>> = dropout.then(|| (0..m * n).map(|i| if i % 4 == 2 { 0.0 } else { 1.25 }).collect());
        let fused = x
            .apply_op3(w.as_tensor(), b.as_tensor(), SparseDenseOp::new(relu, mask.clone(), &rows, &cols, &vals))
            .unwrap();
        let plain = full.matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
        let plain = if relu { plain.relu().unwrap() } else { plain };
        let plain = match mask {
            Some(k) => (plain * Tensor::from_vec(k, (m, n), &dev).unwrap()).unwrap(),
            None => plain,
        };
        assert!(max_diff(&fused, &plain) < 1e-4, "forward relu={relu}");
        let gf = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("W", &w), ("b", &b)] {
            let (a, e) = (gf.get(var).unwrap(), gp.get(var).unwrap());
            assert!(max_diff(a, e) < 1e-3, "d{name} relu={relu}: {}", max_diff(a, e));
        }
    }
    // An entry outside the sparse columns is an error, not a wrong answer.
    let bad = SparseDenseOp::new(false, None, &[0], &[3], &[1.0]);
    assert!(x.apply_op3(w.as_tensor(), b.as_tensor(), bad).is_err());
}

/// `fused::backward` (the fused layers hand their parameter gradients over directly) gives the
/// same gradients as candle's `backward`: for variables used only by fused layers, a variable
/// also used by a tensor op (the two gradients summed), and a weight that is not a variable
/// but computed from one (its gradient must flow on through candle).
#[test]
fn fused_backward_equals_candles_backward() {
    use huse_model::fused::SparseDenseOp;
    let dev = Device::Cpu;
    let (m, d, v, n) = (33, 20, 40, 18);
    let (mut rows, mut cols, mut vals) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..m {
        for e in 0..(r % 4) {
            rows.push(r as u32);
            cols.push((d + (r * 5 + e * 11) % v) as u32);
            vals.push(0.2 + 0.1 * e as f32);
        }
    }
    let x = Tensor::from_vec(values(m * d, 0.41), (m, d), &dev).unwrap();
    let w1 = Var::from_tensor(&Tensor::from_vec(values(n * (d + v), 0.63), (n, d + v), &dev).unwrap()).unwrap();
    let b1 = Var::from_tensor(&Tensor::from_vec(values(n, 1.1), n, &dev).unwrap()).unwrap();
    let w2 = Var::from_tensor(&Tensor::from_vec(values(n * n, 0.77), (n, n), &dev).unwrap()).unwrap();
    let b2 = Var::from_tensor(&Tensor::from_vec(values(n, 0.9), n, &dev).unwrap()).unwrap();
    let w3 = Var::from_tensor(&Tensor::from_vec(values(n * n, 0.53), (n, n), &dev).unwrap()).unwrap();
    let b3 = Var::from_tensor(&Tensor::from_vec(values(n, 0.3), n, &dev).unwrap()).unwrap();
    let c = Tensor::from_vec(values(m * n, 0.19), (m, n), &dev).unwrap();
    let loss = || {
        let h =
            x.apply_op3(w1.as_tensor(), b1.as_tensor(), SparseDenseOp::new(true, None, &rows, &cols, &vals)).unwrap();
        let h =
            h.apply_op3(w2.as_tensor(), b2.as_tensor(), DenseOp { relu: true, mask: None, device_mask: None }).unwrap();
        // A weight computed from a variable: not a leaf, its gradient must reach w3.
        let w3_scaled = w3.as_tensor().affine(0.5, 0.0).unwrap();
        let h =
            h.apply_op3(&w3_scaled, b3.as_tensor(), DenseOp { relu: false, mask: None, device_mask: None }).unwrap();
        // w2 also in a tensor op (an L2 penalty): its gradient is the sum of both uses.
        let penalty = (w2.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.01).unwrap();
        ((h * &c).unwrap().sum_all().unwrap() + penalty).unwrap()
    };
    let plain = loss().backward().unwrap();
    let fused = huse_model::fused::backward(&loss()).unwrap();
    for (name, var) in [("W1", &w1), ("b1", &b1), ("W2", &w2), ("b2", &b2), ("W3", &w3), ("b3", &b3)] {
        let (a, e) = (fused.get(var).unwrap_or_else(|| panic!("no d{name}")), plain.get(var).unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "d{name}"
        );
    }
    // Outside fused::backward the layers give candle their gradients as before.
    assert!(loss().backward().unwrap().get(&w1).is_some());
}

#[test]
fn parallel_dropout_masks_equal_the_sequential_draws_and_leave_the_generator_where_they_would() {
    use huse_model::model::{dropout_mask, dropout_mask_sequential};
    use rand::{RngCore, SeedableRng};
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        // Lengths around the block size, odd and even; generators at odd and even positions.
        for (len, skip) in [(1, 0), (7, 1), (16 * 1024, 0), (16 * 1024 + 1, 3), (100_001, 2), (524_288, 1)] {
            let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            for _ in 0..skip {
                a.next_u32();
            }
            let mut b = a.clone();
            let fast = pool.install(|| dropout_mask(len, 0.15, &mut a)).unwrap();
            let slow = dropout_mask_sequential(len, 0.15, &mut b).unwrap();
            assert!(fast == slow, "{len} values after {skip} words, {threads} threads");
            assert_eq!(a.next_u64(), b.next_u64(), "the generator continues from the same word");
        }
    }
}

#[test]
fn dropout_masks_drop_p_and_scale_the_rest() {
    use huse_model::model::dropout_mask;
    use rand::SeedableRng;
    let draw = |seed| dropout_mask(100_001, 0.15, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).unwrap();
    let mask = draw(7);
    assert_eq!(mask.len(), 100_001);
    let dropped = mask.iter().filter(|&&k| k == 0.0).count() as f64 / mask.len() as f64;
    // 0.15 +- 4 standard deviations (sqrt(0.15 * 0.85 / 1e5) = 0.0011).
    assert!((dropped - 0.15).abs() < 0.0045, "{dropped}");
    assert!(mask.iter().all(|&k| k == 0.0 || (k - 1.0 / 0.85).abs() < 1e-6));
    assert_eq!(mask, draw(7), "same seed, same mask");
    assert_ne!(mask, draw(8));
    assert!(dropout_mask(10, 0.0, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).is_none());
}

#[test]
fn fused_l2_normalise_equals_tensor_ops() {
    use huse_model::model::{l2_normalise, l2_normalise_ops};
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(values(50 * 33, 0.61), (50, 33), &dev).unwrap()).unwrap();
    let c = Tensor::from_vec(values(50 * 33, 0.17), (50, 33), &dev).unwrap();
    let (f, p) = (l2_normalise(x.as_tensor()).unwrap(), l2_normalise_ops(x.as_tensor()).unwrap());
    assert!(max_diff(&f, &p) < 1e-6);
    let norms = f.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
    let gf = (f * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (p * &c).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-5);
    // A zero row stays zero (no NaN).
    let z = l2_normalise(&Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap()).unwrap();
    assert!(z.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0));
}

/// Three training steps of the paper's towers (all three losses, sparse TF-IDF columns,
/// dropout, AdamW) in a rayon pool of `threads`; returns every parameter afterwards.
fn three_steps(threads: usize) -> Vec<Vec<f32>> {
    use huse_model::data::Sparse;
    use huse_model::loss::{self, LossConfig};
    use huse_model::model::{Huse, HuseConfig, Shape};
    use huse_model::optim::{Optimizer, OptimizerConfig};
    use rand::SeedableRng;
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
        let dev = Device::Cpu;
        let (b, di, dt, v, classes) = (300, 300, 200, 500, 12);
        let cfg = HuseConfig { image_input: di, text_input: dt + v, classes, shape: Shape::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let model = Huse::new(&cfg, &mut rng, &dev).unwrap();
        let mut opt = Optimizer::new(
            model.vars(),
            OptimizerConfig::Adamw { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        )
        .unwrap();
        let a = Tensor::from_vec(
            (0..classes * classes)
                .map(|i| if i / classes == i % classes { 0.0 } else { 0.3 + (i % 7) as f32 * 0.1 })
                .collect::<Vec<f32>>(),
            (classes, classes),
            &dev,
        )
        .unwrap();
        for step in 0..3 {
            let xi = Tensor::from_vec(values(b * di, 0.11 + step as f32), (b, di), &dev).unwrap().abs().unwrap();
            let xt = Tensor::from_vec(values(b * dt, 0.07 + step as f32), (b, dt), &dev).unwrap();
            let (mut indptr, mut idx, mut val) = (vec![0i64], Vec::new(), Vec::new());
            for r in 0..b {
                for j in 0..5 {
                    idx.push(((r * 37 + j * 101 + step) % v) as u32);
                    val.push(0.2 + j as f32 * 0.1);
                }
                indptr.push(idx.len() as i64);
            }
            let rows: Vec<usize> = (0..b).collect();
            let sp = Sparse::from_csr_rows((&indptr, &idx, &val), v, &rows, dt, &dev).unwrap();
            let y = Tensor::from_vec((0..b as u32).map(|i| i % classes as u32).collect::<Vec<u32>>(), b, &dev).unwrap();
            // As the train stage does it: towers chained and side by side, fused::backward.
            let _chain = huse_model::fused::chain_towers();
            let (pi, pt) = model.embed_pair(&xi, &xt, Some(&sp), Some((0.15, &mut rng))).unwrap();
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
            opt.step(&huse_model::fused::backward(&l.total).unwrap()).unwrap();
        }
        model.vars().iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    })
}

#[test]
fn a_train_step_gives_the_same_parameters_bit_for_bit_with_one_or_three_threads() {
    // The element-wise passes split work into fixed chunks and add partial sums in chunk
    // order, and each GEMM output is summed in the same order by whichever thread owns it,
    // so the thread count does not change a single bit.
    let one = three_steps(1);
    let three = three_steps(3);
    assert_eq!(one.len(), three.len());
    for (k, (a, b)) in one.iter().zip(&three).enumerate() {
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "parameter {k}: {differ} of {} values differ", a.len());
    }
}

/// Towers chained into one op each (`fused::chain_towers`), alone or both at once
/// (`Huse::embed_pair`), give the same embeddings, the same dropout draws and the same
/// parameter gradients as one op per layer, bit for bit: a dense
/// image tower of three hidden layers and a text tower with the sparse first layer, both with
/// dropout, under a loss that reads both embeddings and the shared layer. Under the guard a
/// plain `Tensor::backward` fails with an error that names the way out, rather than leaving
/// the chained layers' weights without gradients.
#[test]
fn chained_towers_equal_one_op_per_layer() {
    use huse_model::data::Sparse;
    use huse_model::model::{Huse, HuseConfig, Shape};
    use rand::{RngCore, SeedableRng};
    let dev = Device::Cpu;
    let (m, di, d, v) = (70, 40, 24, 30);
    let cfg = HuseConfig {
        image_input: di,
        text_input: d + v,
        classes: 5,
        shape: Shape { dim: 16, hidden: 32, image_layers: 3, text_layers: 2, dropout: 0.2 },
    };
    let model = Huse::new(&cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5), &dev).unwrap();
    let image = Tensor::from_vec(values(m * di, 0.29), (m, di), &dev).unwrap();
    let text = Tensor::from_vec(values(m * d, 0.47), (m, d), &dev).unwrap();
    let (mut rows, mut cols, mut vals) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..m {
        for e in 0..(r % 4) {
            rows.push(r as u32);
            cols.push((d + (r * 7 + e * 13) % v) as u32);
            vals.push(0.3 + 0.1 * e as f32);
        }
    }
    let n = rows.len();
    let sp = Sparse {
        rows: Tensor::from_vec(rows, n, &dev).unwrap(),
        cols: Tensor::from_vec(cols, n, &dev).unwrap(),
        vals: Tensor::from_vec(vals, (n, 1), &dev).unwrap(),
        width: v,
    };
    let c = Tensor::from_vec(values(m * 5, 0.13), (m, 5), &dev).unwrap();
    // Chained or not; both towers through `embed_pair` (at the same time when chained) or one
    // after the other.
    let step = |chain: bool, pair: bool| {
        let _guard = chain.then(huse_model::fused::chain_towers);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (pi, pt) = if pair {
            model.embed_pair(&image, &text, Some(&sp), Some((0.2, &mut rng))).unwrap()
        } else {
            let pi = model.image.embed(&image, Some((0.2, &mut rng))).unwrap();
            (pi, model.text.embed_sparse(&text, Some(&sp), Some((0.2, &mut rng))).unwrap())
        };
        let class = (model.logits(&pi).unwrap() * &c).unwrap().sum_all().unwrap();
        let gap = (&pi * &pt).unwrap().sum_all().unwrap();
        let loss = (class + gap.affine(-0.5, 0.0).unwrap()).unwrap();
        let grads = huse_model::fused::backward(&loss).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g: Vec<(String, Vec<f32>)> = model
            .named_vars()
            .into_iter()
            .map(|(name, var)| (name.clone(), flat(grads.get(var).unwrap_or_else(|| panic!("no gradient for {name}")))))
            .collect();
        (flat(&pi), flat(&pt), g, rng.next_u64())
    };
    let per_layer = step(false, false);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for (chain, pair) in [(true, false), (true, true), (false, true)] {
        let other = pool.install(|| step(chain, pair));
        assert!(other.0 == per_layer.0 && other.1 == per_layer.1, "embeddings differ (chained {chain}, pair {pair})");
        assert_eq!(other.3, per_layer.3, "the dropout generator ends elsewhere (chained {chain}, pair {pair})");
        for ((name, a), (_, b)) in other.2.iter().zip(&per_layer.2) {
            assert!(a == b, "gradient of {name} differs (chained {chain}, pair {pair})");
        }
    }
    let _guard = huse_model::fused::chain_towers();
    let pi = model.image.embed(&image, None).unwrap();
    let err = pi.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("huse_model::fused::backward"), "{err}");
}
