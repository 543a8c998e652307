//! Blob uploads: a session (`POST`, trying cross-repository mounts first),
//! one `PUT` or `PATCH` chunks and a closing `PUT`; a failed session is
//! never retried in place, an interrupted chunk resumes from what the
//! session reports, a session kiln will not use is closed.

use std::sync::atomic::Ordering;

use ureq::http;

use super::{Client, Error, Payload};

impl Client {
    fn location(
        &self,
        method: &str,
        url: &str,
        resp: &http::Response<ureq::Body>,
    ) -> Result<String, Error> {
        resp.headers()
            .get("Location")
            .and_then(|v| v.to_str().ok())
            .map(|l| self.absolute(l))
            .ok_or_else(|| Error::Transport {
                method: method.into(),
                url: url.into(),
                message: "no Location in the answer".into(),
            })
    }

    /// Starts an upload, trying a cross-repository mount from `from` first.
    /// `Ok(None)`: the blob was mounted; else the upload location.
    pub fn start_upload(
        &self,
        repo: &str,
        digest: &str,
        from: Option<&str>,
    ) -> Result<Option<String>, Error> {
        let mut url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        if let Some(f) = from {
            url.push_str(&format!("?mount={digest}&from={f}"));
        }
        let resp = self.send("POST", &url, &[], &Payload::Empty)?;
        match resp.status().as_u16() {
            201 if from.is_some() => Ok(None),
            202 => Ok(Some(self.location("POST", &url, &resp)?)),
            _ => Err(Self::fail("POST", &url, resp)),
        }
    }

    /// Sends one request of an upload session, never retried on its own (a
    /// failure may have ended the session; the caller opens a new one).
    /// Large bodies ask `Expect: 100-continue`, so a registry that refuses
    /// the upload says why before the body is sent; if sending still
    /// fails, the session's status is asked and reported with the error.
    fn send_upload(
        &self,
        method: &str,
        url: &str,
        session: &str,
        headers: &[(&str, String)],
        payload: &Payload<'_>,
    ) -> Result<http::Response<ureq::Body>, Error> {
        let mut headers = headers.to_vec();
        if payload.len() >= 64 << 10 {
            headers.push(("Expect", "100-continue".to_string()));
        }
        match self.send_with(method, url, &headers, payload, 0) {
            Err(Error::Transport {
                method,
                url,
                message,
            }) => {
                let status = match self.send_with("GET", session, &[], &Payload::Empty, 0) {
                    Ok(mut resp) => {
                        let body = super::error_body(&mut resp);
                        format!(
                            "; the registry then answered {}{}{}",
                            resp.status().as_u16(),
                            if body.trim().is_empty() { "" } else { ": " },
                            body.trim()
                        )
                    }
                    Err(_) => "; the registry did not answer a status request either".into(),
                };
                Err(Error::Transport {
                    method,
                    url,
                    message: format!("{message}{status}"),
                })
            }
            r => r,
        }
    }

    /// How much an upload session holds: (its location, the next offset),
    /// from `GET` of the session (`204`, `Range: 0-N`); None if it is gone.
    fn upload_status(&self, location: &str) -> Option<(String, u64)> {
        let resp = self
            .send_with("GET", location, &[], &Payload::Empty, 0)
            .ok()?;
        if resp.status().as_u16() != 204 {
            return None;
        }
        let next = resp
            .headers()
            .get("Range")
            .and_then(|v| v.to_str().ok())
            // `0-N` holds N+1 bytes (distribution writes `0--1` for none).
            .and_then(|r| r.split_once('-'))
            .and_then(|(_, end)| end.trim().parse::<i64>().ok())
            .map_or(0, |end| (end + 1).max(0) as u64);
        let loc = self
            .location("GET", location, &resp)
            .unwrap_or_else(|_| location.to_string());
        Some((loc, next))
    }

    /// Closes an upload session kiln will not use (best effort).
    pub fn cancel_upload(&self, location: &str) {
        let _ = self.send_with("DELETE", location, &[], &Payload::Empty, 0);
    }

    /// Whether an upload failure is worth a new session: the connection
    /// failed, the registry failed (5xx), or it forgot the session (404).
    pub fn upload_retryable(e: &Error) -> bool {
        match e {
            Error::Transport { .. } => true,
            Error::Http { status, .. } => *status >= 500 || *status == 404,
            _ => false,
        }
    }

    /// Uploads a blob at `location`: one PUT if it fits in `chunk` bytes
    /// (or `chunk` is 0), else PATCHes of `chunk` bytes and a closing PUT.
    pub fn upload(
        &self,
        location: &str,
        digest: &str,
        src: &Payload<'_>,
        chunk: u64,
    ) -> Result<(), Error> {
        let size = src.len();
        let with_digest = |loc: &str| {
            let sep = if loc.contains('?') { '&' } else { '?' };
            format!("{loc}{sep}digest={digest}")
        };
        let octet = ("Content-Type", "application/octet-stream".to_string());
        if chunk == 0 || size <= chunk {
            let url = with_digest(location);
            let resp = self.send_upload("PUT", &url, location, &[octet], src)?;
            if resp.status().as_u16() != 201 {
                return Err(Self::fail("PUT", &url, resp));
            }
        } else {
            let mut loc = location.to_string();
            let mut start = 0u64;
            let mut resumed = 0;
            while start < size {
                let len = chunk.min(size - start);
                let part = match src {
                    Payload::File { path, offset, .. } => Payload::File {
                        path,
                        offset: offset + start,
                        len,
                    },
                    Payload::Bytes(b) => Payload::Bytes(&b[start as usize..(start + len) as usize]),
                    Payload::Empty => Payload::Empty,
                };
                let range = format!("{start}-{}", start + len - 1);
                let sent = self.send_upload(
                    "PATCH",
                    &loc,
                    &loc,
                    &[octet.clone(), ("Content-Range", range)],
                    &part,
                );
                let resp = match sent {
                    Ok(resp) if resp.status().as_u16() == 202 => resp,
                    failed => {
                        // An interrupted chunk: ask the session how much it
                        // holds and go on from there (a session the registry
                        // forgot fails, and the caller opens a new one).
                        if resumed < self.retries {
                            if let Some((next, offset)) = self.upload_status(&loc) {
                                if offset <= size {
                                    resumed += 1;
                                    self.backoff(resumed);
                                    loc = next;
                                    start = offset;
                                    continue;
                                }
                            }
                        }
                        return Err(match failed {
                            Ok(resp) => Self::fail("PATCH", &loc, resp),
                            Err(e) => e,
                        });
                    }
                };
                loc = self.location("PATCH", &loc, &resp)?;
                start += len;
            }
            let url = with_digest(&loc);
            let resp = self.send_upload("PUT", &url, &loc, &[octet], &Payload::Empty)?;
            if resp.status().as_u16() != 201 {
                return Err(Self::fail("PUT", &url, resp));
            }
        }
        self.stats.blobs_uploaded.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }
}
