//! `huse-serve`: a small local web page to look at what trained runs do — search products
//! by a sentence or an uploaded photo, see the results of one or more runs side by side as
//! thumbnails with title, class and distance, and open an item's page with its nearest
//! neighbours in both modalities.
//!
//! Safe by default: [`serve`] binds where it is told (the binary's default is 127.0.0.1);
//! uploads are limited in size ([`MAX_UPLOAD`]) and must be JPEG or PNG by their bytes, and
//! their decoded size is bounded before decoding (the encoders' image limits) with at most
//! [`MAX_DECODES`] photo searches at once; a client has [`HEADER_TIMEOUT`] to send a
//! request's headers and at most [`MAX_CONNECTIONS`] connections are open at once;
//! images are served by item number only, and only files inside the dataset's image
//! folder; every bad request gets a 4xx with a one-line reason. Pages are rendered on the
//! server (no script), from [`huse_search::Searcher`]s.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use huse_report::html::{esc, url_enc};
use huse_search::{Hit, Modality, Searcher};
use serde::Deserialize;

/// The largest accepted upload, in bytes.
pub const MAX_UPLOAD: usize = 5 << 20;
/// Photo searches decoded at the same time (the others wait their turn).
pub const MAX_DECODES: usize = 2;
/// How long a client may take to send a request's headers (a slow or stalled client is
/// disconnected instead of holding a connection open).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections open at once; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Results per run: as many as `huse-run search` shows by default.
const K: usize = 10;

/// One run to serve.
pub struct RunView {
    /// Shown above its results (e.g. `#14 base`).
    pub label: String,
    /// Its loaded searcher.
    pub searcher: Searcher,
    /// The folder its item images live in (canonical); nothing outside it is served.
    pub image_root: PathBuf,
    /// Each item's position by its id (the id column's value, which the pages show and
    /// their addresses use).
    by_id: std::collections::HashMap<String, usize>,
}

impl RunView {
    /// Wraps a searcher; the image folder is the deepest folder holding every item image.
    pub fn new(label: String, searcher: Searcher) -> Result<RunView> {
        let mut root: Option<PathBuf> = None;
        for it in searcher.items() {
            let dir = Path::new(&it.image).parent().unwrap_or(Path::new("/")).to_path_buf();
            root = Some(match root {
                None => dir,
                Some(r) => r.ancestors().find(|a| dir.starts_with(a)).unwrap_or(Path::new("/")).to_path_buf(),
            });
        }
        let root = root.context("the run has no items")?;
        let image_root =
            std::fs::canonicalize(&root).with_context(|| format!("the image folder {}", root.display()))?;
        let mut by_id = std::collections::HashMap::new();
        for (i, it) in searcher.items().iter().enumerate() {
            by_id.entry(it.id.clone()).or_insert(i);
        }
        Ok(RunView { label, searcher, image_root, by_id })
    }
}

/// The app's state: the runs, and the turns for decoding uploads.
struct AppState {
    runs: Vec<RunView>,
    decodes: tokio::sync::Semaphore,
    /// What the pages' own links start with (empty at the root; `/run/7/search` inside the
    /// results app).
    base: String,
}

type Runs = Arc<AppState>;

impl std::ops::Deref for AppState {
    type Target = Vec<RunView>;
    fn deref(&self) -> &Vec<RunView> {
        &self.runs
    }
}

/// The web app over `runs` (for tests and embedding); [`serve`] runs it.
pub fn app(runs: Vec<RunView>) -> Router {
    app_at(runs, "")
}

/// The web app with its pages' links under `base` (e.g. `/run/7/search`), for an app that
/// hands it the requests under that prefix with the prefix taken off.
pub fn app_at(runs: Vec<RunView>, base: &str) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/search", get(search_text).post(search_image))
        .route("/item/{run}/{item}", get(item_page))
        .route("/img/{run}/{item}", get(image))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(Arc::new(AppState {
            runs,
            decodes: tokio::sync::Semaphore::new(MAX_DECODES),
            base: base.trim_end_matches('/').to_string(),
        }))
}

/// How patient the server is with its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's headers.
    pub header_timeout: std::time::Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { header_timeout: HEADER_TIMEOUT, max_connections: MAX_CONNECTIONS }
    }
}

/// Serves `runs` on `addr` until the process ends; `ready` gets the bound address (a port
/// of 0 picks a free one). Each connection must send its headers within
/// [`HEADER_TIMEOUT`]; beyond [`MAX_CONNECTIONS`] open at once, new ones are closed.
pub async fn serve(runs: Vec<RunView>, addr: SocketAddr, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    serve_with(runs, addr, Limits::default(), ready).await
}

/// [`serve`] with other [`Limits`].
pub async fn serve_with(
    runs: Vec<RunView>,
    addr: SocketAddr,
    limits: Limits,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    serve_router(app(runs), addr, limits, ready).await
}

/// Serves any axum app on `addr` with `limits` (the header timeout and connection limit
/// [`serve`] has): the results app (`huse-run ui`) runs on the same loop.
pub async fn serve_router(app: Router, addr: SocketAddr, limits: Limits, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    ready(listener.local_addr()?);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = conn.await;
            drop(permit);
        });
    }
}

/// A 4xx (or 500) with a one-line reason, as a small page.
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = page(
            "error",
            &format!("<p class=\"err\">{} — {}</p><p><a href=\"/\">back</a></p>", self.0.as_u16(), esc(&self.1)),
        );
        (self.0, body).into_response()
    }
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} — huse-run</title><style>\
         body{{font-family:sans-serif;margin:1.5em;background:#fafafa}} form{{margin-bottom:1em}} input[type=text]{{width:28em;padding:4px}}\
         .runs{{display:flex;gap:1.5em;align-items:flex-start}} .run{{flex:1;min-width:0}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}\
         .hit{{width:150px;background:#fff;border:1px solid #ddd;padding:4px;font-size:12px;overflow-wrap:anywhere}} .hit img{{width:142px;height:180px;object-fit:contain;background:#f3f3f3}}\
         .cls{{color:#555}} .dist{{color:#0a5}} .err{{color:#b00}} h2{{font-size:16px}}</style></head>\
         <body><h1><a href=\"/\">huse-run</a> — {t}</h1>{body}</body></html>",
        t = esc(title)
    ))
}

fn form(base: &str, q: &str, modality: Modality) -> String {
    let sel = |m: Modality| if m == modality { " selected" } else { "" };
    format!(
        "<form action=\"{base}/search\" method=\"get\"><input type=\"text\" name=\"q\" value=\"{q}\" placeholder=\"red floral summer dress\"> \
         in <select name=\"modality\"><option value=\"image\"{i}>images</option><option value=\"text\"{t}>texts</option></select> \
         <button type=\"submit\">search</button></form>\
         <form action=\"{base}/search\" method=\"post\" enctype=\"multipart/form-data\">or a photo (JPEG or PNG, at most {mb} MB): \
         <input type=\"file\" name=\"image\" accept=\"image/jpeg,image/png\"> <input type=\"hidden\" name=\"modality\" value=\"image\">\
         <button type=\"submit\">search by photo</button></form>",
        q = esc(q),
        i = sel(Modality::Image),
        t = sel(Modality::Text),
        mb = MAX_UPLOAD >> 20
    )
}

fn grid(base: &str, run: usize, hits: &[Hit]) -> String {
    let mut s = String::from("<div class=\"grid\">");
    for (rank, h) in hits.iter().enumerate() {
        s.push_str(&format!(
            "<div class=\"hit\" data-id=\"{id}\" data-rank=\"{r}\"><a href=\"{base}/item/{run}/{ix}\"><img src=\"{base}/img/{run}/{ix}\" alt=\"{title}\" loading=\"lazy\"></a>\
             <div>{r}. {title}</div><div class=\"cls\">{cls}</div><div class=\"cls\">id {id}</div><div class=\"dist\">distance {d:.4}</div></div>",
            id = esc(&h.id),
            r = rank + 1,
            ix = esc(&url_enc(&h.id)),
            title = esc(&h.title),
            cls = esc(&h.class),
            d = h.distance
        ));
    }
    s.push_str("</div>");
    s
}

fn side_by_side(
    runs: &Runs,
    query: &dyn Fn(&Searcher) -> Result<Vec<f32>>,
    modality: Modality,
) -> Result<String, Problem> {
    let mut s = String::from("<div class=\"runs\">");
    for (i, r) in runs.iter().enumerate() {
        let q = query(&r.searcher).map_err(|e| Problem(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
        let hits = r.searcher.search(&q, modality, K);
        s.push_str(&format!(
            "<div class=\"run\" data-run=\"{i}\"><h2>{}</h2>{}</div>",
            esc(&r.label),
            grid(&runs.base, i, &hits)
        ));
    }
    s.push_str("</div>");
    Ok(s)
}

async fn home(State(runs): State<Runs>) -> Html<String> {
    let labels: Vec<String> = runs.iter().map(|r| esc(&r.label)).collect();
    page(
        "search",
        &format!(
            "{}<p>Runs: {}. Results appear side by side, one column per run.</p>",
            form(&runs.base, "", Modality::Image),
            labels.join(", ")
        ),
    )
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    modality: Option<String>,
}

fn modality_of(m: Option<&str>) -> Result<Modality, Problem> {
    m.unwrap_or("image").parse().map_err(|e: String| Problem(StatusCode::BAD_REQUEST, e))
}

async fn search_text(State(runs): State<Runs>, Query(p): Query<SearchQuery>) -> Result<Html<String>, Problem> {
    let modality = modality_of(p.modality.as_deref())?;
    let q = p.q.unwrap_or_default();
    if q.trim().is_empty() {
        return Err(Problem(StatusCode::BAD_REQUEST, "empty query: type a few words".into()));
    }
    if q.len() > 2000 {
        return Err(Problem(StatusCode::BAD_REQUEST, "the query is longer than 2000 characters".into()));
    }
    let body = {
        let (runs, q2) = (runs.clone(), q.clone());
        tokio::task::spawn_blocking(move || side_by_side(&runs, &|s| s.embed_text(&q2), modality))
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    Ok(page(&format!("“{q}”"), &format!("{}{body}", form(&runs.base, &q, modality))))
}

/// What an upload is, by its first bytes.
fn image_kind(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpg")
    } else if b.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        Some("png")
    } else {
        None
    }
}

async fn search_image(State(runs): State<Runs>, mut form_data: Multipart) -> Result<Html<String>, Problem> {
    let too_big =
        || Problem(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is larger than {} MB", MAX_UPLOAD >> 20));
    let mut bytes: Option<Bytes> = None;
    let mut modality = Modality::Image;
    while let Some(field) = form_data.next_field().await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_big()
        } else {
            Problem(StatusCode::BAD_REQUEST, e.body_text())
        }
    })? {
        match field.name() {
            Some("image") => {
                bytes = Some(field.bytes().await.map_err(|e| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        too_big()
                    } else {
                        Problem(StatusCode::BAD_REQUEST, e.body_text())
                    }
                })?)
            }
            Some("modality") => modality = modality_of(Some(&field.text().await.unwrap_or_default()))?,
            _ => {}
        }
    }
    let bytes = bytes.ok_or_else(|| Problem(StatusCode::BAD_REQUEST, "no `image` field in the upload".into()))?;
    if bytes.len() > MAX_UPLOAD {
        return Err(too_big());
    }
    let ext = image_kind(&bytes)
        .ok_or_else(|| Problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the upload is not a JPEG or PNG image".into()))?;
    let file = tempfile::Builder::new()
        .suffix(&format!(".{ext}"))
        .tempfile()
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    std::fs::write(file.path(), &bytes).map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // A few decodes at a time: each may take up to the encoders' decode limit in memory.
    let _turn = runs.decodes.acquire().await.map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let body = {
        let (runs, path) = (runs.clone(), file.path().to_path_buf());
        tokio::task::spawn_blocking(move || side_by_side(&runs, &|s| s.embed_image(&path), modality))
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    Ok(page("photo search", &format!("{}{body}", form(&runs.base, "", modality))))
}

/// The run (its position on the page) and the item (its id) of an address, as positions.
fn locate(runs: &Runs, run: &str, item: &str) -> Result<(usize, usize), Problem> {
    let r: usize = run.parse().map_err(|_| {
        Problem(StatusCode::BAD_REQUEST, format!("bad item address /{run}/{item}: expected a run number"))
    })?;
    if item.contains('/') || item.contains("..") || item.chars().any(char::is_control) {
        return Err(Problem(StatusCode::BAD_REQUEST, format!("bad item id `{}`", item.escape_default())));
    }
    let view = runs.get(r).ok_or_else(|| Problem(StatusCode::NOT_FOUND, format!("no run {r}")))?;
    let i = *view.by_id.get(item).ok_or_else(|| {
        Problem(StatusCode::NOT_FOUND, format!("no item with id `{}` in run {r}", item.escape_default()))
    })?;
    Ok((r, i))
}

async fn item_page(
    State(runs): State<Runs>,
    UrlPath((run, item)): UrlPath<(String, String)>,
) -> Result<Html<String>, Problem> {
    let (r, i) = locate(&runs, &run, &item)?;
    let view = &runs[r];
    let s = &view.searcher;
    let it = &s.items()[i];
    let mut body = format!(
        "{}<div class=\"hit\" style=\"width:300px\"><img src=\"{base}/img/{r}/{}\" style=\"width:292px;height:360px\"><div><b>{}</b></div><div class=\"cls\">{}</div><div>id {} · {:?}</div></div>",
        form(&runs.base, "", Modality::Image),
        esc(&url_enc(&it.id)),
        esc(&it.text),
        esc(s.class_name(it.class)),
        esc(&it.id),
        it.split,
        base = runs.base
    );
    for (title, from, to) in [
        ("nearest images to its image", Modality::Image, Modality::Image),
        ("nearest texts to its text", Modality::Text, Modality::Text),
        ("texts nearest to its image", Modality::Image, Modality::Text),
        ("images nearest to its text", Modality::Text, Modality::Image),
    ] {
        let q = s.item_embedding(i, from).to_vec();
        let hits = s.search_many(&q, to, K, &|_| (from == to).then_some(i)).pop().unwrap_or_default();
        body.push_str(&format!("<h2>{} ({})</h2>{}", title, esc(&view.label), grid(&runs.base, r, &hits)));
    }
    Ok(page(&it.text, &body))
}

async fn image(State(runs): State<Runs>, UrlPath((run, item)): UrlPath<(String, String)>) -> Result<Response, Problem> {
    let (r, i) = locate(&runs, &run, &item)?;
    let view = &runs[r];
    let path = std::fs::canonicalize(&view.searcher.items()[i].image)
        .map_err(|_| Problem(StatusCode::NOT_FOUND, "the image file is missing".into()))?;
    if !path.starts_with(&view.image_root) {
        return Err(Problem(StatusCode::FORBIDDEN, "the image is outside the dataset's image folder".into()));
    }
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| Problem(StatusCode::NOT_FOUND, "the image file cannot be read".into()))?;
    let mime = match image_kind(&bytes) {
        Some("jpg") => "image/jpeg",
        Some("png") => "image/png",
        _ => {
            return Err(Problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the item's file is not a JPEG or PNG image".into(),
            ));
        }
    };
    Ok(([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "max-age=3600")], bytes).into_response())
}

/// The query string of a text search (for links and tests).
pub fn search_url(q: &str, modality: Modality) -> String {
    format!("/search?q={}&modality={}", url_enc(q), if modality == Modality::Image { "image" } else { "text" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_recognised_by_their_bytes() {
        assert_eq!(image_kind(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("jpg"));
        assert_eq!(image_kind(b"\x89PNG\r\n\x1a\n...."), Some("png"));
        assert_eq!(image_kind(b"GIF89a"), None);
        assert_eq!(image_kind(b"<svg"), None);
        assert_eq!(url_enc("red dress & 50%"), "red%20dress%20%26%2050%25");
        assert_eq!(esc("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
    }
}
