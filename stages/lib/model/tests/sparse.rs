//! The sparse first layer (TF-IDF columns gathered instead of multiplied) equals the dense
//! layer on the concatenated input, values and gradients.

use candle_core::{Device, Tensor};
use huse_model::data::Sparse;
use huse_model::model::{Huse, HuseConfig, Shape};
use rand::SeedableRng;

#[test]
fn sparse_text_input_equals_dense() {
    let dev = Device::Cpu;
    let cfg = HuseConfig {
        image_input: 4,
        text_input: 3 + 5,
        classes: 3,
        shape: Shape { dim: 4, hidden: 6, image_layers: 1, text_layers: 2, dropout: 0.0 },
    };
    let m = Huse::new(&cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3), &dev).unwrap();
    let dense = Tensor::new(&[[0.1f32, -0.2, 0.3], [0.5, 0.0, -0.1]], &dev).unwrap();
    // Row 0: columns 3+1 = 0.7, 3+4 = -0.2; row 1: column 3+0 = 1.0.
    let sp = Sparse {
        rows: Tensor::new(&[0u32, 0, 1], &dev).unwrap(),
        cols: Tensor::new(&[4u32, 7, 3], &dev).unwrap(),
        vals: Tensor::new(&[[0.7f32], [-0.2], [1.0]], &dev).unwrap(),
        width: 5,
    };
    let full = Tensor::cat(&[&dense, &sp.to_dense(2, 3).unwrap()], 1).unwrap();
    let a = m.text.embed(&full, None).unwrap();
    let b = m.text.embed_sparse(&dense, Some(&sp), None).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-6, "{diff}");
    let w = &m.text.hidden[0].weight;
    let ga = a.sum_all().unwrap().backward().unwrap();
    let gb = b.sum_all().unwrap().backward().unwrap();
    let gd = (ga.get(w).unwrap() - gb.get(w).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gd < 1e-6, "{gd}");
}
