//! The names of the metrics HUSE logs, written once: the evaluate stage logs them, its
//! tables read them back, and the train stage logs and selects by the validation ones.
//! A name is `SPLIT.WHAT`, with `SPLIT` `test` or `val`.

/// The four retrieval directions: (name, query is the image, gallery is the image).
pub const DIRECTIONS: [(&str, bool, bool); 4] =
    [("i2i", true, true), ("i2t", true, false), ("t2i", false, true), ("t2t", false, false)];

/// The two instance directions (an item's own pair): image -> own text, text -> own image.
pub const INSTANCE_DIRECTIONS: [&str; 2] = ["i2t", "t2i"];

/// What a classification accuracy is of: each tower alone, or both fused.
pub const ACCURACIES: [&str; 3] = ["image", "text", "both"];

/// Recall@K of class retrieval in a direction: `test.i2t.r5`.
pub fn recall(split: &str, direction: &str, k: usize) -> String {
    format!("{split}.{direction}.r{k}")
}

/// Hierarchical precision HP@K in a direction: `test.hp5.i2t`.
pub fn hierarchical_precision(split: &str, direction: &str, k: usize) -> String {
    format!("{split}.hp{k}.{direction}")
}

/// Recall@K of an item's own pair: `test.inst.t2i.r10`.
pub fn instance_recall(split: &str, direction: &str, k: usize) -> String {
    format!("{split}.inst.{direction}.r{k}")
}

/// The median rank of an item's own pair: `test.inst.t2i.medr`.
pub fn instance_median_rank(split: &str, direction: &str) -> String {
    format!("{split}.inst.{direction}.medr")
}

/// The attribute benchmark: of the top K images for an item's attribute query, the share of
/// the same class (`what` = `class`), of the same class and the same value of one attribute
/// (`what` = the attribute's column, `test.attr.baseColour.p10`), or of all (`all`).
pub fn attribute_precision(split: &str, what: &str, k: usize) -> String {
    format!("{split}.attr.{what}.p{k}")
}

/// What [`attribute_precision`] of one attribute would be for a search that finds the class
/// and ignores the attribute: the share of the query's class that shares its value.
pub fn attribute_chance(split: &str, attribute: &str) -> String {
    format!("{split}.attr.{attribute}.chance")
}

/// Classification accuracy: `val.acc.both`.
pub fn accuracy(split: &str, of: &str) -> String {
    format!("{split}.acc.{of}")
}

/// Classification accuracy at one level of the class tree (0 = the root's children): `test.acc.both.l1`.
pub fn level_accuracy(split: &str, of: &str, level: usize) -> String {
    format!("{split}.acc.{of}.l{level}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_ones() {
        assert_eq!(recall("test", "i2t", 5), "test.i2t.r5");
        assert_eq!(hierarchical_precision("test", "t2t", 10), "test.hp10.t2t");
        assert_eq!(instance_recall("val", "t2i", 1), "val.inst.t2i.r1");
        assert_eq!(instance_median_rank("test", "i2t"), "test.inst.i2t.medr");
        assert_eq!(accuracy("val", "both"), "val.acc.both");
        assert_eq!(level_accuracy("test", "image", 2), "test.acc.image.l2");
    }
}
