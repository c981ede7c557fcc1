//! The thin HTTP layer: talking to the Hub (or anything that behaves like
//! it) through surf.

use std::time::Duration;

use futures::AsyncReadExt;
use serde::Deserialize;
use surf::http::{Method, StatusCode, Url};

use crate::FacecrabError;

/// How many redirects a request may follow.
const MAX_REDIRECTS: usize = 5;
/// How often a request whose connection failed is sent again.
const CONNECT_RETRIES: u32 = 3;

/// Connection settings shared by every request.
#[derive(Clone)]
pub(crate) struct HubClient {
    client: surf::Client,
    endpoint: Url,
    token: Option<String>,
    /// Longest wait for response headers or for the next body bytes.
    pub(crate) stall_timeout: Duration,
}

/// What the Hub says about one file before we download it.
#[derive(Debug, Clone)]
pub(crate) struct FileMeta {
    /// The commit the revision resolved to.
    pub(crate) commit: String,
    /// The blob id: the sha256 for LFS files, else the git object id.
    pub(crate) etag: String,
    /// Size in bytes, when announced.
    pub(crate) size: Option<u64>,
}

/// The part of `/api/models/{repo}` we use.
#[derive(Debug, Deserialize)]
pub(crate) struct RepoInfo {
    /// The files of the repository.
    #[serde(default)]
    pub(crate) siblings: Vec<Sibling>,
}

/// One file of a repository listing.
#[derive(Debug, Deserialize)]
pub(crate) struct Sibling {
    /// Its path in the repository.
    pub(crate) rfilename: String,
}

/// An open response whose body is being read.
pub(crate) struct Body {
    response: surf::Response,
    /// The status of the final response (200 or 206).
    pub(crate) status: StatusCode,
    /// Where a 206 response starts.
    pub(crate) range_start: Option<u64>,
    url: String,
    stall_timeout: Duration,
}

impl Body {
    /// Reads until `buf` is full or the body ends; `Ok(0)` at the end.
    ///
    /// The body arrives in pieces of a few KiB; handing whole buffers to
    /// the caller keeps its per-chunk costs (write, hash) low. Bytes read
    /// before an error are returned first; the error comes on the next call.
    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> Result<usize, FacecrabError> {
        let mut filled = 0;
        while filled < buf.len() {
            let piece =
                crate::rt::timeout(self.stall_timeout, self.response.read(&mut buf[filled..]))
                    .await;
            match piece {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => filled += n,
                _ if filled > 0 => break,
                Ok(Err(err)) => return Err(network(&self.url, err.to_string())),
                Err(_) => {
                    return Err(network(
                        &self.url,
                        format!("no data for {:?}", self.stall_timeout),
                    ))
                }
            }
        }
        Ok(filled)
    }
}

fn network(url: &str, reason: String) -> FacecrabError {
    FacecrabError::Network {
        url: url.to_owned(),
        reason,
    }
}

impl HubClient {
    pub(crate) fn new(
        endpoint: &str,
        token: Option<String>,
        stall_timeout: Duration,
    ) -> Result<Self, FacecrabError> {
        let invalid = |reason: String| FacecrabError::InvalidEndpoint {
            url: endpoint.to_owned(),
            reason,
        };
        let parsed =
            Url::parse(endpoint.trim_end_matches('/')).map_err(|err| invalid(err.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(
                "it must be an http:// or https:// address with a host".into(),
            ));
        }
        let endpoint = parsed;
        Ok(Self {
            client: surf::Client::new(),
            endpoint,
            token,
            stall_timeout,
        })
    }

    pub(crate) fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.endpoint.as_str().trim_end_matches('/'), path)
    }

    /// The resolve URL of a file.
    pub(crate) fn file_url(&self, repo: &str, revision: &str, file: &str) -> String {
        self.url(&format!(
            "{repo}/resolve/{}/{file}",
            encode_revision(revision)
        ))
    }

    /// Whether a request to `url` may carry the token: only the Hub's own
    /// scheme, host and port.
    fn may_send_token(&self, url: &Url) -> bool {
        url.scheme() == self.endpoint.scheme()
            && url.host_str() == self.endpoint.host_str()
            && url.port_or_known_default() == self.endpoint.port_or_known_default()
    }

    /// Sends one request (no redirects followed) with the token if allowed,
    /// trying again a few times when the connection itself fails.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        range_from: Option<u64>,
    ) -> Result<surf::Response, FacecrabError> {
        let mut tries = 0;
        loop {
            match self.send_once(method, url, range_from).await {
                Err(FacecrabError::Network { reason, .. }) if tries < CONNECT_RETRIES => {
                    tries += 1;
                    log::debug!("request to {url} failed ({reason}); retrying");
                    crate::rt::sleep(Duration::from_millis(100 << tries)).await;
                }
                result => return result,
            }
        }
    }

    async fn send_once(
        &self,
        method: Method,
        url: &Url,
        range_from: Option<u64>,
    ) -> Result<surf::Response, FacecrabError> {
        let mut request = surf::Request::new(method, url.clone());
        request.insert_header(
            "User-Agent",
            concat!("facecrab/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(token) = self.token.as_deref().filter(|_| self.may_send_token(url)) {
            request.insert_header("Authorization", format!("Bearer {token}"));
        }
        if let Some(from) = range_from {
            request.insert_header("Range", format!("bytes={from}-"));
        }
        match crate::rt::timeout(self.stall_timeout, self.client.send(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(network(url.as_str(), err.to_string())),
            Err(_) => Err(network(
                url.as_str(),
                format!("no response within {:?}", self.stall_timeout),
            )),
        }
    }

    /// Maps error statuses to typed errors.
    fn check_status(
        &self,
        response: &surf::Response,
        url: &Url,
        repo: &str,
        what: &str,
    ) -> Result<(), FacecrabError> {
        let status = response.status();
        match status as u16 {
            200..=399 => Ok(()),
            401 | 403 => Err(FacecrabError::Unauthorized {
                repo: repo.to_owned(),
                status: status as u16,
            }),
            404 => Err(FacecrabError::NotFound {
                name: what.to_owned(),
                reason: format!(
                    "the Hub has no such {} (HTTP 404); check the spelling, the revision, or HF_TOKEN for a private repository",
                    if what.contains("/resolve/") { "file" } else { "repository" }
                ),
            }),
            code => Err(network(url.as_str(), format!("HTTP {code}"))),
        }
    }

    /// Lists a repository's files at a revision.
    pub(crate) async fn repo_info(
        &self,
        repo: &str,
        revision: Option<&str>,
    ) -> Result<RepoInfo, FacecrabError> {
        let path = match revision {
            Some(revision) => format!("api/models/{repo}/revision/{}", encode_revision(revision)),
            None => format!("api/models/{repo}"),
        };
        let url = Url::parse(&self.url(&path)).map_err(|err| network(&path, err.to_string()))?;
        let mut response = self.send(Method::Get, &url, None).await?;
        self.check_status(&response, &url, repo, repo)?;
        let body = crate::rt::timeout(self.stall_timeout, response.body_string())
            .await
            .map_err(|_| network(url.as_str(), "listing timed out".into()))?
            .map_err(|err| network(url.as_str(), err.to_string()))?;
        serde_json::from_str(&body)
            .map_err(|err| network(url.as_str(), format!("unreadable listing: {err}")))
    }

    /// Asks for a file's commit, blob id and size without downloading it.
    pub(crate) async fn file_meta(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
    ) -> Result<FileMeta, FacecrabError> {
        let raw = self.file_url(repo, revision, file);
        let url = Url::parse(&raw).map_err(|err| network(&raw, err.to_string()))?;
        let response = self.send(Method::Head, &url, None).await?;
        self.check_status(&response, &url, repo, &raw)?;
        let header = |name: &str| response.header(name).map(|v| v.last().as_str().to_owned());
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .map(|tag| tag.trim_start_matches("W/").trim_matches('"').to_owned())
            .filter(|tag| {
                !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
            .ok_or_else(|| network(&raw, "the response has no usable ETag".into()))?;
        let commit = header("X-Repo-Commit")
            .filter(|c| crate::cache::is_commit_hash(c))
            .or_else(|| crate::cache::is_commit_hash(revision).then(|| revision.to_owned()))
            .ok_or_else(|| network(&raw, "the response has no X-Repo-Commit header".into()))?;
        let size = header("X-Linked-Size")
            .or_else(|| header("Content-Length").filter(|_| !response.status().is_redirection()))
            .and_then(|s| s.parse().ok());
        Ok(FileMeta { commit, etag, size })
    }

    /// Starts downloading `url` from byte `from`, following redirects and
    /// dropping the token for other hosts.
    pub(crate) async fn open(
        &self,
        raw: &str,
        repo: &str,
        from: u64,
    ) -> Result<Body, FacecrabError> {
        let mut url = Url::parse(raw).map_err(|err| network(raw, err.to_string()))?;
        for _ in 0..=MAX_REDIRECTS {
            let range = (from > 0).then_some(from);
            let response = self.send(Method::Get, &url, range).await?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .header("Location")
                    .map(|v| v.last().as_str().to_owned())
                    .ok_or_else(|| {
                        network(url.as_str(), format!("HTTP {status} without a Location"))
                    })?;
                url = url
                    .join(&location)
                    .map_err(|err| network(url.as_str(), format!("bad redirect: {err}")))?;
                continue;
            }
            if status == StatusCode::RequestedRangeNotSatisfiable {
                return Ok(Body {
                    response,
                    status,
                    range_start: None,
                    url: url.to_string(),
                    stall_timeout: self.stall_timeout,
                });
            }
            self.check_status(&response, &url, repo, raw)?;
            let range_start = response.header("Content-Range").and_then(|v| {
                v.last()
                    .as_str()
                    .strip_prefix("bytes ")?
                    .split('-')
                    .next()?
                    .parse()
                    .ok()
            });
            return Ok(Body {
                response,
                status,
                range_start,
                url: url.to_string(),
                stall_timeout: self.stall_timeout,
            });
        }
        Err(network(raw, format!("more than {MAX_REDIRECTS} redirects")))
    }
}

/// Revisions may hold `/` (e.g. `refs/pr/1`); the Hub wants it escaped.
fn encode_revision(revision: &str) -> String {
    revision.replace('/', "%2F")
}
