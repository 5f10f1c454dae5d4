//! A local OTLP/gRPC trace receiver: what an OpenTelemetry Collector would
//! receive from the services, kept for assertions.
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tonic::{Request, Response, Status};

/// One received span.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// The `service.name` resource attribute.
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    /// String attributes of the span.
    pub attributes: Vec<(String, String)>,
    /// String attributes of its resource (`service.instance.id`, ...).
    pub resource: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// The string attribute `key`, if the span has it.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut out = self.0.lock().expect("otlp lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let resource: Vec<(String, String)> = rs
                .resource
                .as_ref()
                .map(|r| {
                    r.attributes
                        .iter()
                        .filter_map(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Value::StringValue(v)) => Some((a.key.clone(), v.clone())),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attributes = s
                        .attributes
                        .iter()
                        .filter_map(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Value::StringValue(v)) => Some((a.key.clone(), v.clone())),
                            _ => None,
                        })
                        .collect();
                    out.push(ReceivedSpan {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        attributes,
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The receiver; spans accumulate until read.
#[derive(Clone)]
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    addr: std::net::SocketAddr,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind otlp receiver");
        let addr = listener.local_addr().expect("local addr");
        let sink = Sink::default();
        let spans = sink.0.clone();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming(incoming)
                .await;
        });
        Self { spans, addr }
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("otlp lock").clone()
    }
}
