//! `huse-data`: the artifacts the HUSE stages pass to each other — their names and the
//! shared formats — so that no stage depends on another.
//!
//! * [`Artifact`]: every artifact name, in one place; producers declare and write them,
//!   consumers declare and read them by the same value (the example plugin too);
//! * `items.jsonl` ([`Item`], one JSON object a line): written by `ingest`, read by
//!   `encode`, `train`, `evaluate`;
//! * `classes.json` ([`ClassTree`]): the hierarchy, written by `ingest`, read by `graph`,
//!   `train`, `evaluate`;
//! * [`safetensors_out`]: a streaming safetensors writer for large feature matrices.
//!
//! ```
//! use huse_data::Artifact;
//! assert_eq!(Artifact::Items.as_str(), "items.jsonl");
//! assert_eq!(std::path::Path::new("/out").join(Artifact::Model), std::path::Path::new("/out/model.safetensors"));
//! ```

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

pub mod artifact;
pub use artifact::Artifact;

/// Which split an item belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    Train,
    /// The validation split (model selection).
    Val,
    /// The test split (the reported figures).
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    /// `train`, `val` or `test`.
    fn from_str(s: &str) -> Result<Split, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown split `{s}` (train, val or test)"))
    }
}

/// One product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The id column's value.
    pub id: String,
    /// Absolute path of the image.
    pub image: String,
    /// The item's text (title, description).
    pub text: String,
    /// Index of the leaf class in [`ClassTree::classes`].
    pub class: usize,
    /// Which split it is in.
    pub split: Split,
    /// The attribute columns the experiment names (ingest's `attributes:`), e.g.
    /// `baseColour` -> `Red`; empty (and not written) otherwise.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attrs: std::collections::BTreeMap<String, String>,
    /// A search query built from the item's attributes and its leaf class
    /// (`red casual tshirts`), for the attribute benchmark; only with `attributes:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// The items whose attribute query the encode stage encodes, in item order (the rows of
/// its `query_*` tensors): those with a query, outside the training split.
pub fn query_rows(items: &[Item]) -> Vec<usize> {
    items.iter().enumerate().filter(|(_, i)| i.query.is_some() && i.split != Split::Train).map(|(r, _)| r).collect()
}

/// One leaf class: a whole path through the hierarchy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    /// The path joined with `<`, e.g. `Apparel<Topwear<Shirts`.
    pub name: String,
    /// Level names from the root, e.g. `["Apparel", "Topwear", "Shirts"]`.
    pub path: Vec<String>,
    /// Index of this class's ancestor at every level in [`ClassTree::levels`].
    pub ancestors: Vec<usize>,
    /// Items of this class.
    pub count: usize,
}

/// A node of one level of the hierarchy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The path prefix joined with `<`.
    pub name: String,
    /// Index of the parent in the level above (None at level 0).
    pub parent: Option<usize>,
}

/// The class hierarchy: leaf classes (the labels) and every level's nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassTree {
    /// The leaf classes (the labels), by index.
    pub classes: Vec<Class>,
    /// `levels[l]` lists the distinct path prefixes of length `l + 1`.
    pub levels: Vec<Vec<Node>>,
}

impl ClassTree {
    /// Builds the tree from leaf paths (sorted by name; counts given).
    pub fn from_paths(mut leaves: Vec<(Vec<String>, usize)>) -> Self {
        leaves.sort_by_key(|a| a.0.join("<"));
        let depth = leaves.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let mut levels: Vec<Vec<Node>> = vec![Vec::new(); depth];
        let mut classes = Vec::new();
        for (path, count) in leaves {
            let mut ancestors = Vec::new();
            for l in 0..path.len() {
                let name = path[..=l].join("<");
                let parent = if l == 0 { None } else { Some(ancestors[l - 1]) };
                let idx = match levels[l].iter().position(|n| n.name == name) {
                    Some(i) => i,
                    None => {
                        levels[l].push(Node { name, parent });
                        levels[l].len() - 1
                    }
                };
                ancestors.push(idx);
            }
            classes.push(Class { name: path.join("<"), path, ancestors, count });
        }
        ClassTree { classes, levels }
    }

    /// Number of levels shared by the paths of classes `a` and `b` from the root
    /// (the depth of their lowest common ancestor; `depth()` when `a == b`).
    pub fn common_depth(&self, a: usize, b: usize) -> usize {
        let (pa, pb) = (&self.classes[a].ancestors, &self.classes[b].ancestors);
        pa.iter().zip(pb).take_while(|(x, y)| x == y).count()
    }

    /// Number of levels.
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// Writes the tree as JSON (`classes.json`).
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a tree written by [`ClassTree::write`].
    pub fn read(path: &Path) -> Result<Self> {
        serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("parsing {}", path.display()))
    }
}

/// Writes items as JSON lines.
pub fn write_items(path: &Path, items: &[Item]) -> Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for it in items {
        serde_json::to_writer(&mut w, it)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// Reads items written by [`write_items`].
pub fn read_items(path: &Path) -> Result<Vec<Item>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("{}:{}: bad item", path.display(), i + 1))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('<').map(String::from).collect()
    }

    #[test]
    fn tree_levels_parents_and_common_depth() {
        let t = ClassTree::from_paths(vec![
            (p("Footwear<Shoes<Casual"), 3),
            (p("Apparel<Topwear<Shirts"), 5),
            (p("Apparel<Topwear<Tshirts"), 2),
            (p("Apparel<Bottomwear<Jeans"), 1),
        ]);
        let names: Vec<&str> = t.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["Apparel<Bottomwear<Jeans", "Apparel<Topwear<Shirts", "Apparel<Topwear<Tshirts", "Footwear<Shoes<Casual"]
        );
        assert_eq!(t.levels[0].len(), 2);
        assert_eq!(t.levels[1].len(), 3);
        assert_eq!(t.levels[1][1].name, "Apparel<Topwear");
        assert_eq!(t.levels[1][1].parent, Some(0));
        assert_eq!(t.common_depth(1, 2), 2);
        assert_eq!(t.common_depth(0, 1), 1);
        assert_eq!(t.common_depth(0, 3), 0);
        assert_eq!(t.common_depth(3, 3), 3);
    }
}

/// Streams f32 matrices into a safetensors file whose shapes are known up front, so
/// features can be written batch by batch without holding them all in memory.
pub mod safetensors_out {
    use std::io::{BufWriter, Seek, SeekFrom, Write};
    use std::path::Path;

    use anyhow::{Context as _, Result, ensure};

    /// Writer of one file of f32 matrices: each tensor is filled row by row, either in
    /// declaration order ([`Writer::rows`]) or by name ([`Writer::rows_to`], which lets
    /// batches of several tensors interleave).
    pub struct Writer {
        file: BufWriter<std::fs::File>,
        /// (name, rows, cols, rows written, byte offset of its data in the file)
        tensors: Vec<(String, usize, usize, usize, u64)>,
        current: usize,
        /// Where the file's write position is.
        pos: u64,
    }

    impl Writer {
        /// Creates `path` holding f32 tensors `(name, rows, cols)`; fill them with [`Writer::rows`]
        /// or [`Writer::rows_to`].
        pub fn create(path: &Path, tensors: &[(&str, usize, usize)]) -> Result<Self> {
            let mut header = serde_json::Map::new();
            let mut offset = 0usize;
            let mut starts = Vec::new();
            for (name, r, c) in tensors {
                let len = r * c * 4;
                header.insert(
                    name.to_string(),
                    serde_json::json!({"dtype": "F32", "shape": [r, c], "data_offsets": [offset, offset + len]}),
                );
                starts.push(offset as u64);
                offset += len;
            }
            let mut h = serde_json::to_vec(&header)?;
            while h.len() % 8 != 0 {
                h.push(b' ');
            }
            let mut file =
                BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
            file.write_all(&(h.len() as u64).to_le_bytes())?;
            file.write_all(&h)?;
            let base = 8 + h.len() as u64;
            let tensors =
                tensors.iter().zip(starts).map(|((n, r, c), s)| (n.to_string(), *r, *c, 0, base + s)).collect();
            Ok(Writer { file, tensors, current: 0, pos: base })
        }

        /// Appends rows (row-major, `cols` values each) to the first tensor not yet full.
        pub fn rows(&mut self, data: &[f32]) -> Result<()> {
            ensure!(self.current < self.tensors.len(), "all tensors are full");
            self.write(self.current, data)?;
            while self.tensors.get(self.current).is_some_and(|t| t.3 == t.1) {
                self.current += 1;
            }
            Ok(())
        }

        /// Appends rows to the tensor `name`.
        pub fn rows_to(&mut self, name: &str, data: &[f32]) -> Result<()> {
            let i = self
                .tensors
                .iter()
                .position(|t| t.0 == name)
                .with_context(|| format!("no tensor `{name}` was declared"))?;
            self.write(i, data)?;
            while self.tensors.get(self.current).is_some_and(|t| t.3 == t.1) {
                self.current += 1;
            }
            Ok(())
        }

        fn write(&mut self, i: usize, data: &[f32]) -> Result<()> {
            let (name, r, c, done, start) = &mut self.tensors[i];
            ensure!(
                data.len().is_multiple_of(*c),
                "{name}: {} values is not a whole number of rows of {c}",
                data.len()
            );
            let n = data.len() / *c;
            ensure!(*done + n <= *r, "{name}: more than {r} rows");
            let at = *start + (*done * *c * 4) as u64;
            if at != self.pos {
                self.file.seek(SeekFrom::Start(at))?;
            }
            for v in data {
                self.file.write_all(&v.to_le_bytes())?;
            }
            *done += n;
            self.pos = at + data.len() as u64 * 4;
            Ok(())
        }

        /// Checks every tensor is complete and flushes.
        pub fn finish(mut self) -> Result<()> {
            for (name, r, _, done, _) in &self.tensors {
                ensure!(done == r, "{name}: {done} of {r} rows written");
            }
            self.file.flush()?;
            self.file.seek(SeekFrom::End(0))?;
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Reads tensor `name` of a safetensors file by its header (no safetensors crate here).
        fn read(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let t = &h[name];
            let shape = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let (a, b) =
                (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
            let data =
                bytes[8 + n + a..8 + n + b].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (shape, data)
        }

        #[test]
        fn tensors_filled_in_order_or_interleaved_by_name_read_back_the_same() {
            let dir = std::env::temp_dir().join(format!("huse-data-writer-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
            let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
            let y: Vec<f32> = (0..8).map(|v| 100.0 + v as f32).collect();
            let mut w = Writer::create(&a, &[("x", 3, 2), ("y", 4, 2)]).unwrap();
            w.rows(&x[..4]).unwrap();
            w.rows(&x[4..]).unwrap();
            w.rows(&y).unwrap();
            w.finish().unwrap();
            // The same content, batches of both tensors interleaved as encode writes them.
            let mut w = Writer::create(&b, &[("x", 3, 2), ("y", 4, 2)]).unwrap();
            w.rows_to("y", &y[..4]).unwrap();
            w.rows_to("x", &x[..2]).unwrap();
            w.rows_to("y", &y[4..]).unwrap();
            w.rows_to("x", &x[2..]).unwrap();
            assert!(w.rows_to("x", &x[..2]).is_err(), "a full tensor takes no more rows");
            assert!(w.rows_to("z", &x[..2]).is_err());
            w.finish().unwrap();
            let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            assert_eq!(ba, bb);
            assert_eq!(read(&ba, "x"), (vec![3, 2], x));
            assert_eq!(read(&ba, "y"), (vec![4, 2], y));
            let w = Writer::create(&a, &[("x", 3, 2)]).unwrap();
            assert!(w.finish().is_err(), "an incomplete tensor is an error");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
