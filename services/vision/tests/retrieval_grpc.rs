//! `blip2.v1.RetrievalService` over gRPC on loopback, on the retrieval fixture checkpoint
//! (tests/fixtures/models/retrieval-a), checked against the transformers goldens: every RPC,
//! its bad inputs (status codes, and that a failed call changes nothing in the index), and the
//! index surviving a restart with an index directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blip2_model::retrieval::{RetrievalLoadOptions, RetrievalModel};
use blip2_proto::v1::retrieval_service_client::RetrievalServiceClient;
use blip2_proto::v1::{
    search_by_image_request, AddImagesRequest, AddTextsRequest, EmbedImageRequest,
    EmbedTextRequest, ImageItem, MatchRequest, RemoveItemsRequest, RetrievalInfoRequest,
    SearchByImageRequest, SearchByTextRequest,
};
use blip2_vision::retrieval::{RetrievalConfig, RetrievalTier};
use candle_core::{Device, Tensor};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    images: Vec<Vec<u8>>,
    texts: Vec<String>,
    truncated: Vec<bool>,
    gold: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("goldens/retrieval-a/cases.json")).unwrap(),
    )
    .unwrap();
    let images = cases["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| std::fs::read(fixtures().join("images").join(f.as_str().unwrap())).unwrap())
        .collect();
    let texts = cases["texts"].as_array().unwrap();
    Fixture {
        images,
        texts: texts
            .iter()
            .map(|t| t["text"].as_str().unwrap().to_string())
            .collect(),
        truncated: texts
            .iter()
            .map(|t| t["truncated"].as_bool().unwrap())
            .collect(),
        gold: candle_core::safetensors::load(
            fixtures().join("goldens/retrieval-a/retrieval.safetensors"),
            &Device::Cpu,
        )
        .unwrap(),
    }
}

struct Server {
    client: RetrievalServiceClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        (&mut self.task).await.unwrap();
    }
}

async fn start(index_dir: Option<&Path>) -> Server {
    let model = RetrievalModel::load(
        &fixtures().join("models/retrieval-a"),
        &RetrievalLoadOptions::default(),
    )
    .unwrap();
    let index = RetrievalTier::open_index(&model, index_dir).unwrap();
    let config = RetrievalConfig {
        max_top_k: 50,
        max_rerank: 10,
        ..RetrievalConfig::default()
    };
    let tier = RetrievalTier::new(Arc::new(model), "retrieval-a".into(), index, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        blip2_vision::retrieval::serve(
            tier,
            listener,
            async {
                stopped.await.ok();
            },
            None,
        )
        .await
        .unwrap();
    });
    let client = RetrievalServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Server {
        client,
        stop: Some(stop),
        task,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn gold_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

async fn counts(client: &mut RetrievalServiceClient<Channel>) -> (u64, u64) {
    let info = client
        .retrieval_info(RetrievalInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    (info.indexed_images, info.indexed_texts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_and_match_give_reference_values() {
    let f = fixture();
    let server = start(None).await;
    let mut client = server.client.clone();

    let out = client
        .embed_text(EmbedTextRequest {
            texts: f.texts.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let gold_text = f.gold["text_embeds"].to_vec2::<f32>().unwrap();
    for (i, e) in out.embeddings.iter().enumerate() {
        assert_eq!(e.shape, vec![16]);
        assert!(max_diff(&e.values, &gold_text[i]) <= TOLERANCE, "text {i}");
        assert_eq!(out.tokens[i].truncated, f.truncated[i], "text {i}");
    }

    let mut stream = client
        .embed_image(EmbedImageRequest {
            images: f.images.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(item) = stream.next().await {
        let item = item.unwrap();
        assert_eq!(item.index as usize, n);
        let e = item.embedding.unwrap();
        assert_eq!(e.shape, vec![8, 16]);
        let want = gold_vec(&f.gold["image_embeds"].get(n).unwrap());
        assert!(max_diff(&e.values, &want) <= TOLERANCE, "image {n}");
        n += 1;
    }
    assert_eq!(n, f.images.len());

    let probs = f.gold["itm_probs"].to_vec2::<f32>().unwrap();
    let itc = f.gold["itc_scores"].to_vec2::<f32>().unwrap();
    for (b, image) in f.images.iter().enumerate() {
        let out = client
            .r#match(MatchRequest {
                image: image.clone(),
                texts: f.texts.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.scores.len(), f.texts.len());
        for (t, s) in out.scores.iter().enumerate() {
            assert!(
                (s.itm_probability - probs[b][t]).abs() <= TOLERANCE,
                "{b},{t}"
            );
            assert!((s.itc_score - itc[b][t]).abs() <= TOLERANCE, "{b},{t}");
        }
        assert!(out.scores[3].tokens.unwrap().truncated);
    }
    server.stop().await;
}

/// Ids sorted by descending score.
fn order(scores: &[f32], ids: &[u64]) -> Vec<u64> {
    let mut pairs: Vec<(u64, f32)> = ids.iter().copied().zip(scores.iter().copied()).collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs.into_iter().map(|p| p.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_search_and_rerank_follow_the_reference_scores() {
    let f = fixture();
    let server = start(None).await;
    let mut client = server.client.clone();
    let image_ids = client
        .add_images(AddImagesRequest {
            images: f
                .images
                .iter()
                .enumerate()
                .map(|(i, b)| ImageItem {
                    image: b.clone(),
                    label: format!("image-{i}"),
                })
                .collect(),
            discard_images: false,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(image_ids.len(), 3);
    let added = client
        .add_texts(AddTextsRequest {
            texts: f.texts.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let text_ids = added.ids;
    assert_eq!(text_ids.len(), 5);
    assert!(added.tokens[3].truncated);
    assert_eq!(counts(&mut client).await, (3, 5));

    let itc = f.gold["itc_scores"].to_vec2::<f32>().unwrap();
    let probs = f.gold["itm_probs"].to_vec2::<f32>().unwrap();
    for (t, text) in f.texts.iter().enumerate() {
        // ITC only: all images, best first.
        let out = client
            .search_by_text(SearchByTextRequest {
                text: text.clone(),
                top_k: 3,
                rerank_top_n: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let column: Vec<f32> = itc.iter().map(|row| row[t]).collect();
        let got: Vec<u64> = out.hits.iter().map(|h| h.id).collect();
        assert_eq!(got, order(&column, &image_ids), "text {t}");
        for h in &out.hits {
            let b = image_ids.iter().position(|&id| id == h.id).unwrap();
            assert!((h.itc_score - itc[b][t]).abs() <= TOLERANCE);
            assert_eq!(h.label, format!("image-{b}"));
            assert!(h.itm_probability.is_none());
        }
        // Re-ranked by ITM over all three.
        let out = client
            .search_by_text(SearchByTextRequest {
                text: text.clone(),
                top_k: 2,
                rerank_top_n: 3,
            })
            .await
            .unwrap()
            .into_inner();
        let column: Vec<f32> = probs.iter().map(|row| row[t]).collect();
        let got: Vec<u64> = out.hits.iter().map(|h| h.id).collect();
        assert_eq!(got, order(&column, &image_ids)[..2].to_vec(), "text {t}");
        for h in &out.hits {
            let b = image_ids.iter().position(|&id| id == h.id).unwrap();
            assert!((h.itm_probability.unwrap() - probs[b][t]).abs() <= TOLERANCE);
        }
    }

    for (b, &id) in image_ids.iter().enumerate() {
        // By indexed id, and by bytes with ITM re-ranking of the best 4.
        let out = client
            .search_by_image(SearchByImageRequest {
                query: Some(search_by_image_request::Query::ImageId(id)),
                top_k: 5,
                rerank_top_n: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<u64> = out.hits.iter().map(|h| h.id).collect();
        assert_eq!(got, order(&itc[b], &text_ids), "image {b}");
        assert_eq!(
            out.hits[0].label,
            f.texts[text_ids.iter().position(|&i| i == got[0]).unwrap()]
        );
        let out = client
            .search_by_image(SearchByImageRequest {
                query: Some(search_by_image_request::Query::Image(f.images[b].clone())),
                top_k: 5,
                rerank_top_n: 4,
            })
            .await
            .unwrap()
            .into_inner();
        let itc_top4 = order(&itc[b], &text_ids)[..4].to_vec();
        let reranked: Vec<u64> = out.hits[..4].iter().map(|h| h.id).collect();
        let mut expected = itc_top4.clone();
        let p = |id: u64| probs[b][text_ids.iter().position(|&i| i == id).unwrap()];
        expected.sort_by(|x, y| p(*y).total_cmp(&p(*x)));
        assert_eq!(reranked, expected, "image {b}");
        assert!(out.hits[4].itm_probability.is_none());
    }
    server.stop().await;
}

fn expect<T>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, words: &[&str]) {
    let status = match r {
        Ok(_) => panic!("expected {code:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{}", status.message());
    for w in words {
        assert!(
            status.message().contains(w),
            "{:?} lacks {w}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_statuses_and_changes_nothing() {
    let f = fixture();
    let server = start(None).await;
    let mut client = server.client.clone();
    let ids = client
        .add_images(AddImagesRequest {
            images: vec![ImageItem {
                image: f.images[0].clone(),
                label: "a".into(),
            }],
            discard_images: true,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    client
        .add_texts(AddTextsRequest {
            texts: vec!["a cat".into()],
        })
        .await
        .unwrap();

    let search = |text: &str, top_k, rerank_top_n| SearchByTextRequest {
        text: text.into(),
        top_k,
        rerank_top_n,
    };
    expect(
        client.search_by_text(search("", 3, 0)).await,
        Code::InvalidArgument,
        &["empty"],
    );
    expect(
        client.search_by_text(search("a cat", 0, 0)).await,
        Code::InvalidArgument,
        &["top_k"],
    );
    expect(
        client.search_by_text(search("a cat", 51, 0)).await,
        Code::InvalidArgument,
        &["top_k", "50"],
    );
    expect(
        client.search_by_text(search("a cat", 3, 11)).await,
        Code::InvalidArgument,
        &["rerank_top_n"],
    );
    expect(
        client
            .search_by_image(SearchByImageRequest {
                query: Some(search_by_image_request::Query::ImageId(999)),
                top_k: 3,
                rerank_top_n: 0,
            })
            .await,
        Code::NotFound,
        &["999"],
    );
    // An image added without its bytes cannot be re-ranked.
    expect(
        client
            .search_by_image(SearchByImageRequest {
                query: Some(search_by_image_request::Query::ImageId(ids[0])),
                top_k: 3,
                rerank_top_n: 1,
            })
            .await,
        Code::FailedPrecondition,
        &["discard_images"],
    );
    expect(
        client
            .r#match(MatchRequest {
                image: f.images[0].clone(),
                texts: vec!["a cat".into(), "   ".into()],
            })
            .await,
        Code::InvalidArgument,
        &["texts[1]", "empty"],
    );
    expect(
        client.embed_text(EmbedTextRequest { texts: vec![] }).await,
        Code::InvalidArgument,
        &["texts"],
    );

    // Failed adds and removes change nothing.
    let before = counts(&mut client).await;
    expect(
        client
            .add_images(AddImagesRequest {
                images: vec![
                    ImageItem {
                        image: f.images[1].clone(),
                        label: "ok".into(),
                    },
                    ImageItem {
                        image: b"not an image".to_vec(),
                        label: "bad".into(),
                    },
                ],
                discard_images: false,
            })
            .await,
        Code::InvalidArgument,
        &["images[1]"],
    );
    expect(
        client
            .add_texts(AddTextsRequest {
                texts: vec!["fine".into(), "".into()],
            })
            .await,
        Code::InvalidArgument,
        &["texts[1]"],
    );
    expect(
        client
            .remove_items(RemoveItemsRequest {
                image_ids: ids.clone(),
                text_ids: vec![12345],
            })
            .await,
        Code::NotFound,
        &["12345"],
    );
    assert_eq!(counts(&mut client).await, before);
    // The image is still there and searchable.
    let out = client
        .search_by_text(search("a cat", 3, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.hits.iter().map(|h| h.id).collect::<Vec<_>>(), ids);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_dir_survives_a_restart() {
    let f = fixture();
    let dir = std::env::temp_dir().join(format!("blip2-retrieval-grpc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let server = start(Some(&dir)).await;
    let mut client = server.client.clone();
    let image_ids = client
        .add_images(AddImagesRequest {
            images: f
                .images
                .iter()
                .map(|b| ImageItem {
                    image: b.clone(),
                    label: String::new(),
                })
                .collect(),
            discard_images: false,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let text_ids = client
        .add_texts(AddTextsRequest {
            texts: f.texts.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    client
        .remove_items(RemoveItemsRequest {
            image_ids: vec![image_ids[0]],
            text_ids: vec![text_ids[2]],
        })
        .await
        .unwrap();
    let query = SearchByTextRequest {
        text: f.texts[1].clone(),
        top_k: 5,
        rerank_top_n: 2,
    };
    let before = client
        .search_by_text(query.clone())
        .await
        .unwrap()
        .into_inner();
    server.stop().await;

    let server = start(Some(&dir)).await;
    let mut client = server.client.clone();
    assert_eq!(counts(&mut client).await, (2, 4));
    let after = client.search_by_text(query).await.unwrap().into_inner();
    assert_eq!(before.hits, after.hits);
    // New ids do not reuse old ones.
    let more = client
        .add_texts(AddTextsRequest {
            texts: vec!["one more".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert!(more[0] > *text_ids.iter().max().unwrap());
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
