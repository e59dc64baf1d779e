//! Text cleaning, a configured step of `ingest` (so it is cached with the items, and what
//! trains is what evaluates): HTML tags and entities, URLs, runs of whitespace and of
//! punctuation, optional lower-casing and a list of regex replacements, in that order.
//! The same [`Cleaner`] is applied to search queries (`huse-run search`, `serve`), so a
//! query is cleaned exactly as the titles were.

use regex::Regex;
use serde::{Deserialize, Serialize};

/// `clean:` in ingest's config. Every switch is off unless set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CleanCfg {
    /// Remove HTML tags (`<b>`, `<br/>`) and decode entities (`&amp;`, `&#39;`, `&eacute;`).
    pub html: bool,
    /// Remove `http(s)://...` and `www....` addresses.
    pub urls: bool,
    /// Runs of the same punctuation mark become one (`!!!` -> `!`, `...` -> `.`).
    pub punctuation: bool,
    /// Lower-case everything.
    pub lowercase: bool,
    /// `[pattern, replacement]` pairs (Rust regex syntax, `$1` for groups), applied in order.
    pub replace: Vec<(String, String)>,
}

/// A compiled [`CleanCfg`].
#[derive(Debug, Clone)]
pub struct Cleaner {
    cfg: CleanCfg,
    tags: Regex,
    space_before_punct: Regex,
    urls: Regex,
    replace: Vec<(Regex, String)>,
}

impl Cleaner {
    /// Compiles the config; a bad pattern is an error naming it (`replace.N`).
    pub fn new(cfg: &CleanCfg) -> Result<Cleaner, (String, String)> {
        let replace = cfg
            .replace
            .iter()
            .enumerate()
            .map(|(i, (p, r))| {
                Regex::new(p)
                    .map(|re| (re, r.clone()))
                    .map_err(|e| (format!("replace.{i}"), format!("bad pattern `{p}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Cleaner {
            cfg: cfg.clone(),
            tags: Regex::new(r"<[^<>]*>").unwrap(),
            space_before_punct: Regex::new(r"\s+([.,;:!?])").unwrap(),
            urls: Regex::new(r"(?i)\b(?:https?://|www\.)\S+").unwrap(),
            replace,
        })
    }

    /// Whether the cleaner changes anything at all.
    pub fn is_identity(&self) -> bool {
        self.cfg == CleanCfg::default()
    }

    /// The cleaned text; whitespace runs always collapse to one space and the ends are trimmed.
    pub fn clean(&self, text: &str) -> String {
        let mut s = text.to_string();
        if self.cfg.html {
            // A tag becomes a space (so `<p>a</p><p>b</p>` keeps two words), but no space is
            // left before punctuation that followed it (`<b>Tee</b>.` -> `Tee.`).
            s = self.tags.replace_all(&s, " ").into_owned();
            s = self.space_before_punct.replace_all(&s, "$1").into_owned();
            s = html_escape::decode_html_entities(&s).into_owned();
        }
        if self.cfg.urls {
            s = self.urls.replace_all(&s, " ").into_owned();
        }
        if self.cfg.punctuation {
            // The regex crate has no back-references: collapse each mark's runs in turn.
            for mark in ['!', '?', '.', ',', ';', ':', '-', '_', '*', '~', '=', '#'] {
                let run = Regex::new(&format!(
                    r"{}(?:\s*{})+",
                    regex::escape(&mark.to_string()),
                    regex::escape(&mark.to_string())
                ))
                .unwrap();
                s = run.replace_all(&s, mark.to_string().as_str()).into_owned();
            }
        }
        if self.cfg.lowercase {
            s = s.to_lowercase();
        }
        for (re, r) in &self.replace {
            s = re.replace_all(&s, r.as_str()).into_owned();
        }
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_switch_by_hand() {
        let all = CleanCfg {
            html: true,
            urls: true,
            punctuation: true,
            lowercase: true,
            replace: vec![(r"(\d+)\s*ml".into(), "$1 ml".into())],
        };
        let c = Cleaner::new(&all).unwrap();
        assert_eq!(c.clean("<p>Tom &amp; Jerry&#39;s <b>Tee</b></p>"), "tom & jerry's tee");
        assert_eq!(c.clean("See https://shop.example/x?y=1 or www.example.com now"), "see or now");
        assert_eq!(c.clean("Great!!! Really?? Yes... -- ok"), "great! really? yes. - ok");
        assert_eq!(c.clean("Perfume 100ml"), "perfume 100 ml");
        let none = Cleaner::new(&CleanCfg::default()).unwrap();
        assert!(none.is_identity());
        assert_eq!(none.clean("  <b>Keep</b>   As &amp; Is!! "), "<b>Keep</b> As &amp; Is!!");
        let e = Cleaner::new(&CleanCfg { replace: vec![("(".into(), "".into())], ..Default::default() }).unwrap_err();
        assert_eq!(e.0, "replace.0");
    }
}
