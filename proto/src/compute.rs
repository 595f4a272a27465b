//! `Expert.Compute` without copying tensors through tonic's codec (see [`crate::wire`]): a
//! client over any tonic channel, and a server that takes the method over from a generated
//! `ExpertServer` and leaves it the others. Both speak ordinary gRPC, so either side
//! interoperates with generated code.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::v1::{Dtype, ExpertRows, Tensor};
use crate::wire::{
    COMPUTE_PATH, ComputeRequest, Frames, TensorFrames, WireError, read_request, read_response,
    request_head, response_head,
};

/// A body of ready buffers, sent as they are, then optional trailers.
struct Parts {
    data: VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for Parts {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        Poll::Ready(match this.data.pop_front() {
            Some(b) => Some(Ok(Frame::data(b))),
            None => this.trailers.take().map(|t| Ok(Frame::trailers(t))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.iter().map(|b| b.len() as u64).sum())
    }
}

fn grpc_headers(h: &mut http::HeaderMap) {
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
}

fn wire_status(e: WireError) -> Status {
    match e {
        WireError::Compressed => Status::unimplemented(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

/// The most an oversized request is read past its refusal.
const DRAIN: usize = 256 << 20;

/// Reads one gRPC message from `body`, then the rest of the stream, and the status in its
/// trailers when `trailers` (a response). The message is returned as the frames it came in.
async fn read_message<B>(body: B, limit: usize, trailers: bool) -> Result<Option<Frames>, Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<StdError>,
{
    let mut body = std::pin::pin!(body);
    let mut frames = Frames::default();
    let mut message = None;
    let mut status = None;
    // A request refused for its size is read to its end (up to `DRAIN` bytes) before the
    // refusal is sent: answering while the client still sends would reset the stream, and the
    // client would see a transport error instead of the reason.
    let (mut refused, mut drained) = (None, 0);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        match frame.into_data() {
            Ok(data) if refused.is_some() => {
                drained += data.len();
                if drained > DRAIN {
                    break;
                }
            }
            Ok(data) if message.is_none() => {
                frames.push(data);
                match frames.next_message(limit) {
                    Ok(m) => message = m,
                    Err(e @ WireError::TooLarge { .. }) if !trailers => {
                        refused = Some(e);
                        frames = Frames::default();
                    }
                    Err(e) => return Err(wire_status(e)),
                }
            }
            // A unary call carries one message: anything after it is ignored.
            Ok(_) => {}
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    status = Status::from_header_map(&t);
                }
            }
        }
    }
    if let Some(e) = refused {
        return Err(wire_status(e));
    }
    if trailers {
        match status {
            Some(s) if s.code() != Code::Ok => return Err(s),
            Some(_) => {}
            None => return Err(Status::internal("response ended without a grpc-status")),
        }
    }
    Ok(message)
}

/// A failure below gRPC: the transport's own code where it has one (a stream the server reset
/// on its deadline is CANCELLED), else `UNAVAILABLE` (no connection, or one that closed), which
/// callers may retry.
fn unavailable(e: impl Into<StdError>) -> Status {
    let s = Status::from_error(e.into());
    if s.code() == Code::Unknown {
        Status::unavailable(format!("transport: {}", s.message()))
    } else {
        s
    }
}

/// Calls `Expert.Compute` over `channel` (a tonic `Channel`, or any gRPC service).
#[derive(Debug, Clone)]
pub struct ComputeClient<T> {
    inner: T,
    max_response: usize,
}

impl<T> ComputeClient<T>
where
    T: GrpcService<Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<StdError>,
{
    /// A client accepting responses of up to `max_response` bytes.
    pub fn new(inner: T, max_response: usize) -> Self {
        Self {
            inner,
            max_response,
        }
    }

    /// Sends `input` (its buffer is handed to the transport as it is) for `experts` of
    /// `layer` and returns the output tensor still in the frames it arrived in.
    pub async fn compute(
        &mut self,
        metadata: MetadataMap,
        timeout: Option<Duration>,
        layer: u32,
        experts: &[ExpertRows],
        input: Tensor,
    ) -> Result<TensorFrames, Status> {
        let dtype = Dtype::try_from(input.dtype).unwrap_or(Dtype::Unspecified);
        let head = request_head(layer, experts, dtype, &input.shape, input.data.len());
        let body = Parts {
            data: VecDeque::from([head, input.data]),
            trailers: None,
        };
        let mut req = http::Request::new(Body::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(COMPUTE_PATH);
        *req.version_mut() = http::Version::HTTP_2;
        // tonic spells `grpc-timeout` into the metadata.
        let mut meta = tonic::Request::from_parts(metadata, tonic::Extensions::default(), ());
        if let Some(t) = timeout {
            meta.set_timeout(t);
        }
        *req.headers_mut() = meta.into_parts().0.into_headers();
        let h = req.headers_mut();
        grpc_headers(h);
        h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        std::future::poll_fn(|cx| self.inner.poll_ready(cx))
            .await
            .map_err(unavailable)?;
        let resp = self.inner.call(req).await.map_err(unavailable)?;
        let (head, body) = resp.into_parts();
        if let Some(s) = Status::from_header_map(&head.headers)
            && s.code() != Code::Ok
        {
            return Err(s);
        }
        if head.status != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "HTTP status {} from the expert shard",
                head.status
            )));
        }
        let message = read_message(body, self.max_response, true)
            .await?
            .ok_or_else(|| Status::internal("response carried no message"))?;
        read_response(message)
            .map_err(|e| Status::internal(format!("expert response: {e}")))?
            .ok_or_else(|| Status::internal("expert response without an output tensor"))
    }
}

/// What serves `Expert.Compute` behind a [`ComputeServer`].
#[tonic::async_trait]
pub trait ComputeHandler: Send + Sync + 'static {
    /// Computes a request whose input tensor still lies in the frames it arrived in; returns
    /// the output tensor (its buffer is handed to the transport as it is).
    async fn compute(&self, req: ComputeRequest, metadata: MetadataMap) -> Result<Tensor, Status>;
}

/// Serves `Expert.Compute` with `handler` and every other method of the service with `inner`
/// (a generated `ExpertServer`).
pub struct ComputeServer<H, S> {
    handler: Arc<H>,
    inner: S,
    max_request: usize,
}

impl<H, S: Clone> Clone for ComputeServer<H, S> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            inner: self.inner.clone(),
            max_request: self.max_request,
        }
    }
}

impl<H: ComputeHandler, S> ComputeServer<H, S> {
    /// Accepts requests of up to `max_request` bytes.
    pub fn new(handler: Arc<H>, inner: S, max_request: usize) -> Self {
        Self {
            handler,
            inner,
            max_request,
        }
    }
}

async fn serve<H: ComputeHandler>(
    handler: Arc<H>,
    req: http::Request<Body>,
    limit: usize,
) -> Result<Tensor, Status> {
    let (head, body) = req.into_parts();
    let message = read_message(body, limit, false)
        .await?
        .ok_or_else(|| Status::invalid_argument("request carried no message"))?;
    let req = read_request(message).map_err(wire_status)?;
    handler
        .compute(req, MetadataMap::from_headers(head.headers))
        .await
}

fn response(out: Tensor) -> http::Response<Body> {
    let dtype = Dtype::try_from(out.dtype).unwrap_or(Dtype::Unspecified);
    let head = response_head(dtype, &out.shape, out.data.len());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let mut resp = http::Response::new(Body::new(Parts {
        data: VecDeque::from([head, out.data]),
        trailers: Some(trailers),
    }));
    grpc_headers(resp.headers_mut());
    resp
}

impl<H, S> Service<http::Request<Body>> for ComputeServer<H, S>
where
    H: ComputeHandler,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != COMPUTE_PATH {
            return Box::pin(self.inner.call(req));
        }
        let (handler, limit) = (self.handler.clone(), self.max_request);
        Box::pin(async move {
            Ok(match serve(handler, req, limit).await {
                Ok(out) => response(out),
                Err(s) => s.into_http(),
            })
        })
    }
}

impl<H, S: NamedService> NamedService for ComputeServer<H, S> {
    const NAME: &'static str = S::NAME;
}
