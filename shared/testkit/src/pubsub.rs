//! A local server that speaks Google Cloud Pub/Sub's gRPC Subscriber API
//! (`StreamingPull`, `Acknowledge`, `ModifyAckDeadline`), since Google Cloud
//! is out of reach here. The real client (`google-cloud-pubsub`) talks to it
//! unchanged, through `with_endpoint`. Messages not acknowledged can be
//! delivered again on demand, as Pub/Sub does after an ack deadline.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{
    AcknowledgeRequest, ModifyAckDeadlineRequest, PubsubMessage, ReceivedMessage, StreamingPullRequest,
    StreamingPullResponse,
};
use tokio::sync::mpsc;
use tonic::codegen::{http, BoxFuture, Context, Poll, Service, StdError};
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct State {
    next: u64,
    /// ack id -> message, delivered and not yet acknowledged.
    outstanding: BTreeMap<String, ReceivedMessage>,
    /// Which stream holds each outstanding message: a stream that breaks
    /// (its client died) gives its messages back, as Pub/Sub does when
    /// their leases lapse.
    holder: HashMap<String, u64>,
    next_stream: u64,
    acked: Vec<String>,
    /// Open streaming pulls.
    streams: Vec<(u64, mpsc::UnboundedSender<Result<StreamingPullResponse, Status>>)>,
    /// Published before any stream was open.
    backlog: Vec<ReceivedMessage>,
    subscriptions_seen: Vec<String>,
}

/// The fake Pub/Sub server.
#[derive(Clone)]
pub struct FakePubSub {
    state: Arc<Mutex<State>>,
    addr: std::net::SocketAddr,
}

impl FakePubSub {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake pubsub");
        let addr = listener.local_addr().expect("local addr");
        let state: Arc<Mutex<State>> = Default::default();
        let svc = SubscriberService { state: state.clone() };
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("fake pubsub stopped: {e}");
            }
        });
        Self { state, addr }
    }

    /// `http://127.0.0.1:PORT`, for `with_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes a message to every open streaming pull (or keeps it until one opens).
    pub fn publish(&self, data: Vec<u8>, attributes: HashMap<String, String>) -> String {
        let mut s = self.state.lock().expect("fake pubsub lock");
        s.next += 1;
        let id = s.next.to_string();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let msg = ReceivedMessage {
            ack_id: format!("ack-{id}"),
            message: Some(PubsubMessage {
                data,
                attributes,
                message_id: id.clone(),
                publish_time: Some(prost_types::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                ordering_key: String::new(),
            }),
            delivery_attempt: 0,
        };
        deliver(&mut s, msg);
        id
    }

    /// Delivers every unacknowledged message again.
    pub fn redeliver_unacked(&self) -> usize {
        let mut s = self.state.lock().expect("fake pubsub lock");
        let again: Vec<ReceivedMessage> = s.outstanding.values().cloned().collect();
        for m in &again {
            deliver(&mut s, m.clone());
        }
        again.len()
    }

    pub fn acked(&self) -> Vec<String> {
        self.state.lock().expect("fake pubsub lock").acked.clone()
    }

    pub fn outstanding(&self) -> usize {
        self.state.lock().expect("fake pubsub lock").outstanding.len()
    }

    /// Subscriptions clients asked for.
    pub fn subscriptions_seen(&self) -> Vec<String> {
        self.state.lock().expect("fake pubsub lock").subscriptions_seen.clone()
    }
}

fn deliver(s: &mut State, msg: ReceivedMessage) {
    s.outstanding.insert(msg.ack_id.clone(), msg.clone());
    s.streams.retain(|(_, t)| !t.is_closed());
    // The newest stream: an older one may belong to a client that just died.
    match s.streams.last().cloned() {
        Some((id, tx)) => {
            s.holder.insert(msg.ack_id.clone(), id);
            let _ = tx.send(Ok(StreamingPullResponse { received_messages: vec![msg], ..Default::default() }));
        }
        None => {
            s.holder.remove(&msg.ack_id);
            s.backlog.push(msg)
        }
    }
}

#[derive(Clone)]
struct SubscriberService {
    state: Arc<Mutex<State>>,
}

impl tonic::server::NamedService for SubscriberService {
    const NAME: &'static str = "google.pubsub.v1.Subscriber";
}

type ResponseStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<StreamingPullResponse, Status>> + Send>>;

struct StreamingPull(Arc<Mutex<State>>);

impl tonic::server::StreamingService<StreamingPullRequest> for StreamingPull {
    type Response = StreamingPullResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<StreamingPullRequest>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let mut inbound = request.into_inner();
            let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty StreamingPull"))?;
            if first.subscription.is_empty() {
                return Err(Status::invalid_argument("the first StreamingPullRequest must name a subscription"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let stream_id = {
                let mut s = state.lock().expect("fake pubsub lock");
                s.subscriptions_seen.push(first.subscription.clone());
                ack(&mut s, &first.ack_ids);
                s.next_stream += 1;
                let id = s.next_stream;
                let backlog: Vec<ReceivedMessage> = std::mem::take(&mut s.backlog);
                if !backlog.is_empty() {
                    for m in &backlog {
                        s.holder.insert(m.ack_id.clone(), id);
                    }
                    let _ = tx.send(Ok(StreamingPullResponse { received_messages: backlog, ..Default::default() }));
                }
                s.streams.push((id, tx));
                id
            };
            // Later requests on the stream may carry acks.
            let st = state.clone();
            tokio::spawn(async move {
                while let Ok(Some(req)) = inbound.message().await {
                    ack(&mut st.lock().expect("fake pubsub lock"), &req.ack_ids);
                }
                // The client went away: what it held unacked goes out again.
                let mut s = st.lock().expect("fake pubsub lock");
                s.streams.retain(|(i, _)| *i != stream_id);
                let held: Vec<ReceivedMessage> = s
                    .holder
                    .iter()
                    .filter(|(_, i)| **i == stream_id)
                    .filter_map(|(a, _)| s.outstanding.get(a).cloned())
                    .collect();
                for m in held {
                    deliver(&mut s, m);
                }
            });
            let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
            Ok(Response::new(Box::pin(out) as ResponseStream))
        })
    }
}

fn ack(s: &mut State, ids: &[String]) {
    for id in ids {
        if s.outstanding.remove(id).is_some() {
            s.acked.push(id.clone());
        }
    }
}

struct Acknowledge(Arc<Mutex<State>>);

impl tonic::server::UnaryService<AcknowledgeRequest> for Acknowledge {
    type Response = ();
    type Future = BoxFuture<Response<()>, Status>;
    fn call(&mut self, request: Request<AcknowledgeRequest>) -> Self::Future {
        ack(&mut self.0.lock().expect("fake pubsub lock"), &request.get_ref().ack_ids);
        Box::pin(async { Ok(Response::new(())) })
    }
}

struct ModifyAckDeadline;

impl tonic::server::UnaryService<ModifyAckDeadlineRequest> for ModifyAckDeadline {
    type Response = ();
    type Future = BoxFuture<Response<()>, Status>;
    fn call(&mut self, _request: Request<ModifyAckDeadlineRequest>) -> Self::Future {
        Box::pin(async { Ok(Response::new(())) })
    }
}

impl<B> Service<http::Request<B>> for SubscriberService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        match req.uri().path() {
            "/google.pubsub.v1.Subscriber/StreamingPull" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.streaming(StreamingPull(state), req).await)
            }),
            "/google.pubsub.v1.Subscriber/Acknowledge" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Acknowledge(state), req).await)
            }),
            "/google.pubsub.v1.Subscriber/ModifyAckDeadline" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(ModifyAckDeadline, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("not implemented by the fake").into_http()) }),
        }
    }
}
