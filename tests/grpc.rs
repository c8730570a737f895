//! gRPC end to end through envgate, with tonic on both sides: a unary call (its status and
//! message intact, errors too), a bidirectional stream (each message answered before the
//! next is sent), and envgate's own UNAVAILABLE when every node is down.

mod support;

use std::pin::Pin;
use std::time::Duration;

use support::*;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
}

/// `test.Echo`: `Unary` answers `echo:<text>` (or NOT_FOUND for `fail`), `Bidi` answers
/// each message as it comes.
#[derive(Clone)]
struct Echo;

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Unary;

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFuture<tonic::Response<Msg>, tonic::Status>;
    fn call(&mut self, request: tonic::Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let m = request.into_inner();
            if m.text == "fail" {
                return Err(tonic::Status::not_found("no such thing"));
            }
            Ok(tonic::Response::new(Msg {
                text: format!("echo:{}", m.text),
            }))
        })
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, tonic::Status>> + Send>>;

struct Bidi;

impl tonic::server::StreamingService<Msg> for Bidi {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<tonic::Response<MsgStream>, tonic::Status>;
    fn call(&mut self, request: tonic::Request<tonic::Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let mut inbound = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(m)) = inbound.message().await {
                    let reply = Msg {
                        text: format!("echo:{}", m.text),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(
                Box::pin(ReceiverStream::new(rx)) as MsgStream
            ))
        })
    }
}

impl<B> Service<http::Request<B>> for Echo
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match req.uri().path() {
            "/test.Echo/Unary" => Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
                Ok(tonic::server::Grpc::new(codec).unary(Unary, req).await)
            }),
            "/test.Echo/Bidi" => Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
                Ok(tonic::server::Grpc::new(codec).streaming(Bidi, req).await)
            }),
            _ => Box::pin(
                async move { Ok(tonic::Status::unimplemented("no such method").into_http()) },
            ),
        }
    }
}

async fn grpc_node() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Echo)
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
    addr
}

async fn client(port: u16) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn unary(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    text: &str,
) -> Result<String, tonic::Status> {
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
    let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
    grpc.unary(
        tonic::Request::new(Msg {
            text: text.to_string(),
        }),
        path,
        codec,
    )
    .await
    .map(|r| r.into_inner().text)
}

fn topology(node: std::net::SocketAddr) -> String {
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ type: tcp, interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }} }}
nodes: {{ g: {{ address: "{node}", protocol: h2c }} }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [g] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_calls_and_a_bidirectional_stream_through_envgate() {
    for workers in [1, 2] {
        let node = grpc_node().await;
        let eg = Envgate::start_with(&topology(node), workers);
        let mut grpc = client(eg.port("http")).await;

        assert_eq!(unary(&mut grpc, "hello").await.unwrap(), "echo:hello");
        // An error status from the node, with its message, reaches the client intact.
        let e = unary(&mut grpc, "fail").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(e.message(), "no such thing");

        // Bidirectional: each message answered before the next is sent.
        let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/test.Echo/Bidi");
        let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
        tx.send(Msg { text: "1".into() }).await.unwrap();
        let resp = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
            .await
            .unwrap();
        let mut inbound = resp.into_inner();
        for i in 1..=3 {
            let m = tokio::time::timeout(Duration::from_secs(5), inbound.next())
                .await
                .expect("an answer before the next message")
                .unwrap()
                .unwrap();
            assert_eq!(m.text, format!("echo:{i}"));
            if i < 3 {
                tx.send(Msg {
                    text: (i + 1).to_string(),
                })
                .await
                .unwrap();
            }
        }
        drop(tx);
        // The stream ends with grpc-status OK in the trailers.
        assert!(inbound.message().await.unwrap().is_none());
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_down_is_unavailable_to_a_grpc_client() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let eg = Envgate::start(&topology(dead));
    let topo = eg.server().control().topology();
    assert!(
        eventually(Duration::from_secs(5), || async {
            topo.nodes[0].state.health() == envgate::health::Health::Down
        })
        .await
    );
    let mut grpc = client(eg.port("http")).await;
    let e = unary(&mut grpc, "hello").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no_healthy_node"), "{e:?}");
    eg.stop().await;
}
