//! The one Kubernetes client factory of `serve`.
//!
//! Owns: turning the `kubeconfig` setting (a file, or `in-cluster` for the
//! pod's service account) into a `kube::Client`, built at most once per
//! server and shared by every controller and token source; and the bounds
//! on every call it makes ([`Deadlines`]): kube's client has no read
//! timeout by default and retries 429/503/504 with a backoff that grows to
//! minutes, so without them one hung connection stalls its caller forever.
//! Must not: call the API server itself (building a client contacts
//! nothing), or decide which features need a client.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::sync::OnceCell;
use tower::{BoxError, Layer, Service};

/// The `kubeconfig` value that means "the pod's own service account".
pub(crate) use crate::authn::tokenreview::IN_CLUSTER;

/// Why no client could be built from the configured credentials.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `in-cluster` outside a pod (no service-account mount or environment).
    #[error("in-cluster configuration: {0} (is this running in a pod?)")]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig file is missing, unreadable or does not describe a cluster.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The file named by the setting.
        path: PathBuf,
        /// What kube said about it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The configuration was read but kube could not build a client from it.
    #[error("kube client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds a client from a kubeconfig path (or [`IN_CLUSTER`]).
pub async fn connect(path: &Path) -> Result<kube::Client, ClientError> {
    if path.as_os_str() == IN_CLUSTER {
        // The pod's service account: token, CA and API server address from
        // the standard mounts and environment.
        let cfg = kube::Config::incluster().map_err(ClientError::InCluster)?;
        return bounded(cfg, DEADLINES);
    }
    let bad = |source| ClientError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(bad)?;
    bounded(cfg, DEADLINES)
}

/// How long a TCP (and TLS) connection to the API server may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one write of a request may block (kube's default is 295 s).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on each API call that is not a watch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Until the response head arrives, kube's own retries of 429/503/504
    /// (which honour `Retry-After`) included.
    pub response: Duration,
    /// Between two pieces of a response body.
    pub idle: Duration,
}

/// The bounds of `serve`'s client. The response limit is kube-apiserver's
/// own `--request-timeout` (60 s) for requests that are not watches, so no
/// answer the server would still give is cut off. Callers with tighter
/// needs (the Lease round) cut their calls shorter themselves.
pub(crate) const DEADLINES: Deadlines = Deadlines {
    response: Duration::from_secs(60),
    idle: Duration::from_secs(30),
};

/// A call ran out of time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeadlineError {
    /// No response head in time.
    #[error("the Kubernetes API server did not answer within {}s", .0.as_secs_f32())]
    Response(Duration),
    /// The response body stopped arriving.
    #[error("the Kubernetes API server stopped sending its answer for {}s", .0.as_secs_f32())]
    Idle(Duration),
}

/// `cfg` with connect and write timeouts, and every call but a watch's
/// body bounded by `limits`. No connection-level read timeout: it would also
/// cut quiet watch streams, whose liveness the watch loop checks itself
/// (kube-runtime's watcher gives up on a stream silent for its server
/// timeout plus 5 s, and the API server sends bookmarks meanwhile).
pub(crate) fn bounded(
    mut cfg: kube::Config,
    limits: Deadlines,
) -> Result<kube::Client, ClientError> {
    cfg.connect_timeout = Some(CONNECT_TIMEOUT);
    cfg.write_timeout = Some(WRITE_TIMEOUT);
    cfg.read_timeout = None;
    let builder = kube::client::ClientBuilder::try_from(cfg).map_err(ClientError::Client)?;
    Ok(builder.with_layer(&DeadlineLayer(limits)).build())
}

/// Whether a request opens a watch (`?watch=true`, as kube sends it).
fn is_watch(uri: &http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"))
}

/// Puts [`Deadline`] around kube's whole stack (its retries included).
struct DeadlineLayer(Deadlines);

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limits: self.0,
        }
    }
}

/// Bounds the wait for a response head (every request: the API server
/// sends a watch's head at once) and the gaps in a response body (every
/// request but a watch, whose stream may rightly be quiet for minutes).
pub(crate) struct Deadline<S> {
    inner: S,
    limits: Deadlines,
}

type BoxedCall<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

impl<S, B> Service<http::Request<kube::client::Body>> for Deadline<S>
where
    S: Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<IdleBody<B>>;
    type Error = BoxError;
    type Future = BoxedCall<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let idle = (!is_watch(req.uri())).then_some(self.limits.idle);
        let limit = self.limits.response;
        let call = self.inner.call(req);
        Box::pin(async move {
            let res = tokio::time::timeout(limit, call)
                .await
                .map_err(|_| Box::new(DeadlineError::Response(limit)) as BoxError)?
                .map_err(Into::into)?;
            Ok(res.map(|body| IdleBody {
                body,
                idle,
                timer: None,
            }))
        })
    }
}

/// A response body that fails once nothing arrived for `idle`.
pub(crate) struct IdleBody<B> {
    body: B,
    idle: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> HttpBody for IdleBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.timer = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some(idle) = this.idle else {
            return Poll::Pending;
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(DeadlineError::Idle(idle))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The server's Kubernetes client: built on first use from the configured
/// kubeconfig, then shared (a `kube::Client` is a cheap handle to one
/// connection pool). Lazily, so a feature that does not need the API server
/// never fails start-up on bad credentials, exactly as before the factory.
#[derive(Default)]
pub struct Factory {
    kubeconfig: Option<PathBuf>,
    client: OnceCell<kube::Client>,
}

impl std::fmt::Debug for Factory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Factory")
            .field("kubeconfig", &self.kubeconfig)
            .field("built", &self.client.initialized())
            .finish()
    }
}

impl Factory {
    /// A factory for `kubeconfig` (None: Kubernetes is not configured).
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Self {
            kubeconfig,
            client: OnceCell::new(),
        }
    }

    /// Whether credentials are configured at all.
    pub fn configured(&self) -> bool {
        self.kubeconfig.is_some()
    }

    /// The shared client; None when no kubeconfig is configured. A failed
    /// build is not remembered: the next caller tries again.
    pub async fn client(&self) -> Result<Option<kube::Client>, ClientError> {
        let Some(path) = &self.kubeconfig else {
            return Ok(None);
        };
        self.client
            .get_or_try_init(|| connect(path))
            .await
            .map(|c| Some(c.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Deadlines = Deadlines {
        response: Duration::from_millis(300),
        idle: Duration::from_millis(300),
    };

    /// A plain-HTTP server that reads each request, writes `answer`, then
    /// holds the connection open without another byte (a stalled server).
    async fn stalling_server(answer: Vec<u8>) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(&answer).await;
                    std::future::pending::<()>().await;
                    drop(s);
                });
            }
        });
        addr
    }

    fn api_at(addr: std::net::SocketAddr) -> kube::Api<ConfigMap> {
        let cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
        kube::Api::namespaced(bounded(cfg, SHORT).unwrap(), "ns")
    }

    /// A chunked 200 whose body starts with one watch event, then stops.
    fn head_and_one_event() -> Vec<u8> {
        let event = r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a","resourceVersion":"1"}}}"#.to_string() + "\n";
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        out.extend(format!("{:x}\r\n{event}\r\n", event.len()).into_bytes());
        out
    }

    /// Without the deadline kube waits forever for a server that accepted
    /// the connection and never answers.
    #[tokio::test]
    async fn a_call_that_is_never_answered_fails_at_the_response_deadline() {
        let api = api_at(stalling_server(Vec::new()).await);
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), api.get("x"))
            .await
            .expect("bounded by the client, not by this test")
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= SHORT.response && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(
            err.to_string().contains("did not answer within 0.3s"),
            "{err}"
        );
    }

    /// A body that stops arriving fails after the idle limit; a watch that
    /// is quiet just as long stays open (its idleness is the watch loop's
    /// to judge).
    #[tokio::test]
    async fn a_stalled_body_fails_but_a_quiet_watch_stays_open() {
        let api = api_at(stalling_server(head_and_one_event()).await);
        let started = std::time::Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(10), api.get("a")).await;
        let err = got.expect("bounded by the client").unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= SHORT.idle && took < Duration::from_secs(3),
            "{took:?} {err}"
        );

        let mut events = api
            .watch(&kube::api::WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        let first = events.next().await.unwrap().unwrap();
        assert!(
            matches!(first, kube::api::WatchEvent::Added(_)),
            "{first:?}"
        );
        let quiet = tokio::time::timeout(SHORT.idle * 4, events.next()).await;
        assert!(quiet.is_err(), "the quiet watch was cut: {quiet:?}");
    }

    #[tokio::test]
    async fn no_kubeconfig_means_no_client_and_no_error() {
        let f = Factory::new(None);
        assert!(!f.configured());
        assert!(f.client().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_names_the_file() {
        let f = Factory::new(Some("/nonexistent/meshca-kubeconfig".into()));
        let Err(e) = f.client().await else {
            panic!("a missing kubeconfig gave a client");
        };
        assert!(matches!(e, ClientError::Kubeconfig { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("kubeconfig /nonexistent/meshca-kubeconfig: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_client_is_built_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:1'}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {token: t}\n",
        )
        .unwrap();
        let f = Factory::new(Some(kc.clone()));
        assert!(f.client().await.unwrap().is_some());
        // Built once: deleting the file now cannot make a later call fail,
        // whereas building again would.
        std::fs::remove_file(&kc).unwrap();
        assert!(f.client().await.unwrap().is_some());
        assert!(Factory::new(Some(kc)).client().await.is_err());
    }
}
