//! `blip2 serve retrieval` as a separate process: serves RetrievalService on the retrieval
//! fixture checkpoint, and with `--index-dir` its index survives the process being killed
//! (SIGKILL, no shutdown) and started again.

mod common;

use blip2_proto::v1::retrieval_service_client::RetrievalServiceClient;
use blip2_proto::v1::{
    AddImagesRequest, AddTextsRequest, ImageItem, RetrievalInfoRequest, SearchByTextRequest,
};
use common::{fixture, spawn};

fn serve(index_dir: &std::path::Path) -> common::Tier {
    let model = fixture("models/retrieval-a");
    spawn(&[
        "retrieval",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().unwrap(),
        "--index-dir",
        index_dir.to_str().unwrap(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_retrieval_keeps_its_index_across_a_kill() {
    let dir = std::env::temp_dir().join(format!("blip2-e2e-retrieval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let image = std::fs::read(fixture("images/photo.jpg")).unwrap();

    let tier = serve(&dir);
    let mut client = RetrievalServiceClient::connect(tier.addr.clone())
        .await
        .unwrap();
    let info = client
        .retrieval_info(RetrievalInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.num_query_tokens, info.embed_dim), (8, 16));
    assert_eq!((info.indexed_images, info.indexed_texts), (0, 0));
    let ids = client
        .add_images(AddImagesRequest {
            images: vec![ImageItem {
                image,
                label: "photo".into(),
            }],
            discard_images: false,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    client
        .add_texts(AddTextsRequest {
            texts: vec!["a red square".into(), "a cat".into()],
        })
        .await
        .unwrap();
    drop(client);
    drop(tier); // SIGKILL

    let tier = serve(&dir);
    let mut client = RetrievalServiceClient::connect(tier.addr.clone())
        .await
        .unwrap();
    let info = client
        .retrieval_info(RetrievalInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.indexed_images, info.indexed_texts), (1, 2));
    let hits = client
        .search_by_text(SearchByTextRequest {
            text: "a red square".into(),
            top_k: 1,
            rerank_top_n: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    assert_eq!((hits[0].id, hits[0].label.as_str()), (ids[0], "photo"));
    assert!(hits[0].itm_probability.is_some());
    drop(tier);
    let _ = std::fs::remove_dir_all(&dir);
}
