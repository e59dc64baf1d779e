//! `huse-run report` and `export` on a database with known rows, and the page in Chromium.

mod common;

use std::collections::BTreeSet;

use common::{check_app_endpoints, enc, get, get_with, known_runs, start_ui};

#[test]
fn report_references_every_figure_and_shows_the_database_numbers() {
    let sb = known_runs();
    let out = sb.path().join("rep");
    let printed = sb.run(&["report", "q", "--out", out.to_str().unwrap(), "-m", "sum"]).expect(0).stdout();
    assert!(printed.contains("index.html"), "{printed}");
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let files: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".svg"))
        .collect();
    let referenced: BTreeSet<String> =
        html.split("src=\"").skip(1).map(|s| s.split('"').next().unwrap().to_string()).collect();
    assert_eq!(files, referenced, "every figure is on the page and every image exists");
    // 1 sweep heatmap (sum over factor x offset) + one chart per multi-step metric (loss,
    // 3 steps) with the four runs overlaid — not one chart per run and metric.
    assert!(files.contains("sweep-0.svg") && files.contains("curve-loss.svg") && files.len() == 2, "{files:?}");
    let curves = std::fs::read_to_string(out.join("curve-loss.svg")).unwrap();
    for point in ["mid.factor=1,mid.offset=0", "mid.factor=2,mid.offset=1"] {
        assert!(curves.contains(point), "the legend names every sweep point: {point}");
    }
    // The legend stands beside the 460-pixel chart, not over its curves.
    let width: u32 = curves.split("width=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    assert!(width > 460 + 100, "{width}");
    // The runs table scrolls inside the page instead of overflowing it.
    assert!(html.contains("<div class=\"scroll\"><table>"));
    for f in &files {
        let svg = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(
            svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{f} is not an SVG document"
        );
        assert!(
            svg.matches("<path").count() + svg.matches("<rect").count() + svg.matches("<polyline").count() > 3,
            "{f} draws something"
        );
    }
    // The numbers equal the database's, and the best one is marked.
    let rows = sb.sql(
        "SELECT r.id, f.value FROM runs r JOIN final_metrics f ON f.run_id = r.id AND f.key = 'sum' ORDER BY r.id",
    );
    for r in &rows {
        let v: f64 = r[1].parse().unwrap();
        let cell = format!(">{v:.0}</td>");
        assert!(html.contains(&cell), "run {} value {v} missing", r[0]);
    }
    assert!(html.contains("<td class=\"best\">16</td>"));
    assert_eq!(html.matches("class=\"best\"").count(), 1);
    // The heatmap shows the cell means (here single runs).
    let heat = std::fs::read_to_string(out.join("sweep-0.svg")).unwrap();
    let texts: Vec<String> = heat
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>').map(|(_, r)| r.split("</text>").next().unwrap().trim().to_string()))
        .collect();
    for v in ["6", "10", "12", "16"] {
        assert!(texts.iter().any(|t| t == v), "heatmap lacks {v}: {texts:?}");
    }
    // Resolved config and commit are there.
    assert!(html.contains("resolved config") && html.contains("mid:"), "config missing");
    // Regenerating from the database alone gives the same page (no cache needed).
    std::fs::remove_dir_all(sb.cache()).unwrap();
    let out2 = sb.path().join("rep2");
    sb.run(&["report", "q", "--out", out2.to_str().unwrap(), "-m", "sum"]).expect(0);
    assert_eq!(std::fs::read_to_string(out2.join("index.html")).unwrap().replace("rep2", "rep"), html);
    assert!(sb.run(&["report", "nope"]).expect(1).stderr().contains("no runs of experiment `nope`"));
}

#[test]
fn export_writes_params_and_metrics_in_long_form() {
    let sb = known_runs();
    let csv = sb.run(&["export", "-e", "q"]).expect(0).stdout();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "run_id,experiment,run,status,kind,key,step,value");
    assert!(lines.contains(&"4,q,\"q@mid.factor=2,mid.offset=1\",succeeded,metric,sum,0,16"), "{csv}");
    assert!(lines.contains(&"1,q,\"q@mid.factor=1,mid.offset=0\",succeeded,param,mid.factor,,1"), "{csv}");
    // The device is stored once, as the run's column, and exported with the params.
    assert!(lines.contains(&"1,q,\"q@mid.factor=1,mid.offset=0\",succeeded,param,device,,auto"), "{csv}");
    assert_eq!(sb.count("SELECT count(*) FROM params WHERE key = 'device'"), 0);
    let n_metrics = sb.count("SELECT count(*) FROM metrics");
    let n_params = sb.count("SELECT count(*) FROM params") + sb.count("SELECT count(*) FROM runs");
    assert_eq!(lines.len() as i64 - 1, n_metrics + n_params);
    let out = sb.path().join("x.json");
    sb.run(&["export", "-f", "json", "--out", out.to_str().unwrap()]).expect(0);
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(j.as_array().unwrap().len() as i64, n_metrics + n_params);
    assert!(j.as_array().unwrap().iter().any(|r| r["key"] == "sum" && r["value"] == 16.0 && r["run_id"] == 4));
}

#[test]
fn the_page_renders_in_headless_chromium() {
    let sb = known_runs();
    let out = sb.path().join("rep");
    sb.run(&["report", "q", "--out", out.to_str().unwrap(), "-m", "sum"]).expect(0);
    let shot = sb.path().join("shot.png");
    let status = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", sb.path().join("chromium").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", out.join("index.html").display()))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("chromium must be installed (Debian package `chromium`; .ci/run installs it)");
    assert!(status.success());
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (1200, 900));
    let inked = img.pixels().filter(|p| p.0.iter().any(|c| *c < 200)).count();
    let share = inked as f64 / (1200.0 * 900.0);
    assert!(share > 0.01, "the screenshot is blank ({share:.4} of pixels inked)");
    // Not a single flat colour either: the page has text, figures and a table.
    let colours: BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 20, "{} colours", colours.len());
}

/// The ids of the runs table's rows, in order.
fn row_ids(html: &str) -> Vec<String> {
    html.split("<td><a href=\"/run/").skip(1).map(|s| s.split('"').next().unwrap().to_string()).collect()
}

#[test]
fn the_results_app_lists_sorts_filters_groups_and_pages() {
    let sb = known_runs();
    // A second experiment with seeds: two sweep points x two seeds (sum = 6 * factor + 4 * seed).
    let g = sb.write(
        "g.yaml",
        "name: g\nrepeat: 2\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { add_seed: true } }\n  total: { uses: toy-sum, needs: [mid] }\n\
         sweep:\n  mid.factor: [1, 2]\n",
    );
    sb.run(&[g.to_str().unwrap()]).expect(0);
    let (_server, addr) = start_ui(&sb, &[]);
    assert!(addr.starts_with("127.0.0.1:"), "loopback by default: {addr}");

    // The experiments, their runs by state.
    let (status, home) = get(&addr, "/");
    assert_eq!(status, 200);
    assert!(home.contains("<a href=\"/exp/q\">q</a>") && home.contains("4 succeeded"), "{home}");
    // The runs table: varying params and the headline metric by default; sorting by a header.
    let (status, page) = get(&addr, "/exp/q");
    assert_eq!(status, 200, "{page}");
    assert_eq!(row_ids(&page), ["1", "2", "3", "4"]);
    for col in ["mid.factor", "mid.offset", ">sum<"] {
        assert!(page.contains(col), "{col}: {page}");
    }
    assert!(!page.contains(">mean</a>"), "only headline metrics by default");
    assert_eq!(row_ids(&get(&addr, "/exp/q?sort=sum&desc=1").1), ["4", "3", "2", "1"]);
    assert_eq!(row_ids(&get(&addr, "/exp/q?sort=mid.offset").1), ["1", "3", "2", "4"], "stable, as the table sorts");
    let (status, body) = get(&addr, "/exp/q?sort=nosuch");
    assert!(status == 400 && body.contains("cannot sort by `nosuch`"), "{status} {body}");
    // A filter with OR and IN, and one with a mistake: 400 with the column.
    let q = format!("/exp/q?q={}", enc("mid.offset in (1) or sum < 7"));
    assert_eq!(row_ids(&get(&addr, &q).1), ["1", "2", "4"]);
    let (status, body) = get(&addr, &format!("/exp/q?q={}", enc("sum >")));
    assert_eq!(status, 400);
    assert!(body.contains("at column 6: expected a value"), "{body}");
    let (status, body) = get(&addr, &format!("/exp/q?q={}", enc("summ > 1")));
    assert_eq!(status, 400);
    assert!(body.contains("did you mean `sum`"), "{body}");
    // Grouping over seeds: mean ± std and n.
    let (_, grouped) = get(&addr, "/exp/g?group=1");
    assert!(grouped.contains("8 ± 2.8284") && grouped.contains("14 ± 2.8284"), "{grouped}");
    assert!(grouped.contains("2 group(s) of 4 run(s)"), "{grouped}");
    // Grouping by a chosen param pools the others: q's four runs by mid.factor alone.
    let (status, by) = get(&addr, "/exp/q?group=1&by=mid.factor");
    assert_eq!(status, 200, "{by}");
    assert!(by.contains("8 ± 2.8284") && by.contains("14 ± 2.8284") && by.contains("2 group(s) of 4 run(s)"), "{by}");
    assert_eq!(get(&addr, "/exp/q?group=1&by=nosuch").0, 400);
    // Each value over a run's history instead of its last: q's loss is factor / (step + 1) over
    // three steps, so run 4 (factor 2) has last 0.6667, max 2, min 0.6667, mean 1.2222.
    let loss_of_4 = |value: &str| {
        let (status, csv) = get(&addr, &format!("/exp/q?format=csv&cols=id,loss&value={value}"));
        assert_eq!(status, 200, "{csv}");
        csv.lines().find(|l| l.starts_with("4,")).unwrap().split(',').nth(1).unwrap().to_string()
    };
    assert_eq!(
        ["last", "max", "min", "mean"].map(loss_of_4),
        ["0.6666666666666666", "2", "0.6666666666666666", "1.222222222222222"],
        "the loss of run 4 as each value"
    );
    let (_, by_max) = get(&addr, &format!("/exp/q?value=max&q={}", enc("loss >= 2")));
    assert_eq!(row_ids(&by_max), ["3", "4"], "the filter reads the chosen value");
    // Chosen columns, and the CSV of the current view.
    let (_, cols) = get(&addr, "/exp/q?col=id&col=mean&sort=mean");
    assert!(cols.contains(">mean</a>") && !cols.contains(">mid.factor</a>"), "{cols}");
    let (status, head, csv) = get_with(&addr, &format!("/exp/q?format=csv&sort=sum&desc=1&q={}", enc("sum > 6")), "");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: text/csv"), "{head}");
    assert_eq!(csv.lines().map(|l| l.split(',').next().unwrap()).collect::<Vec<_>>(), ["id", "4", "3", "2"], "{csv}");
    // A run's page: its curve as a chart, params, stages, config.
    let (status, run) = get(&addr, "/run/4");
    assert_eq!(status, 200);
    assert!(
        run.contains("<svg") && run.contains("mid.factor") && run.contains("toy-scale") && run.contains("name: q"),
        "{run}"
    );
    // Bad requests: unknown 404, malformed 400, nothing leaks.
    assert_eq!(get(&addr, "/exp/nope").0, 404);
    assert_eq!(get(&addr, "/run/999").0, 404);
    assert_eq!(get(&addr, "/run/abc").0, 400);
    for bad in
        ["/exp/..%2F..%2Fetc%2Fpasswd", "/../../etc/passwd", "/run/..%2F..%2Fetc%2Fpasswd", "/static/../../etc/passwd"]
    {
        let (status, body) = get(&addr, bad);
        assert!((400..500).contains(&status), "{bad}: {status}");
        assert!(!body.contains("root:"), "{bad} leaks a file");
    }
    // Strings from the data are escaped.
    assert!(!get(&addr, &format!("/exp/q?q={}", enc("name = '<script>'"))).1.contains("<script>"));

    // In Chromium: the sorted table renders with the same rows.
    let dom = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--dump-dom"])
        .arg(format!("--user-data-dir={}", sb.path().join("chromium-ui").display()))
        .arg(format!("http://{addr}/exp/q?sort=sum&desc=1"))
        .stderr(std::process::Stdio::null())
        .output()
        .expect("chromium must be installed");
    assert_eq!(row_ids(&String::from_utf8_lossy(&dom.stdout)), ["4", "3", "2", "1"]);
}

#[test]
fn the_results_app_needs_its_token_and_refuses_other_hosts_without_one() {
    let sb = known_runs();
    let out = sb.run(&["ui", "--port", "0", "--host", "0.0.0.0"]).expect(2);
    assert!(out.stderr().contains("give a --token"), "{}", out.stderr());
    let token = "correct-horse-battery-staple";
    let (_server, addr) = start_ui(&sb, &["--token", token]);
    let (status, body) = get(&addr, "/exp/q");
    assert_eq!(status, 401, "{body}");
    assert_eq!(get(&addr, "/exp/q?token=wrong-token-wrong-token").0, 401);
    let (status, head, _) = get_with(&addr, &format!("/exp/q?token={token}"), "");
    assert_eq!(status, 200);
    assert!(head.contains(&format!("huse_ui_token={token}")), "the token is kept in a cookie: {head}");
    assert_eq!(get_with(&addr, "/run/1", &format!("Cookie: huse_ui_token={token}\r\n")).0, 200);
    assert_eq!(get_with(&addr, "/", &format!("Authorization: Bearer {token}\r\n")).0, 200);
}

#[test]
fn the_results_app_serves_curves_compare_and_its_assets() {
    let sb = known_runs();
    let (_server, addr) = start_ui(&sb, &[]);
    check_app_endpoints(&addr);
}

#[test]
fn the_results_app_charts_brush_compare_and_follow_the_database_in_chromium() {
    let sb = known_runs();
    let (_server, addr) = start_ui(&sb, &[]);
    common::drive_the_app_in_chromium(&sb, &addr, &[]);
}
