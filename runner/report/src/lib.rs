//! `huse-report`: presenting results from the results database — tables for `runs`,
//! `compare`, `best` and `show` in four formats ([`table`]), the static HTML report with
//! its SVG figures ([`html`]), a study's page ([`study`]), and long-form CSV/JSON exports ([`export`]).
//!
//! Everything here reads through [`huse_store::Store`]'s typed methods; no SQL.
//!
//! ```
//! use huse_report::table::{Cell, Format, Table};
//! let t = Table { headers: vec!["run".into(), "acc".into()], rows: vec![vec![Cell::Int(1), Cell::Num(Some(0.5))]] };
//! assert_eq!(t.render(Format::Csv), "run,acc\n1,0.5\n");
//! ```

pub mod export;
pub mod html;
pub mod study;
pub mod table;

pub use export::export;
pub use html::{default_out, report};
pub use table::{Cell, Format, Table};
