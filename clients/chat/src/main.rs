//! `blip2-chat`: an interactive client of the BLIP-2 session tier.
//!
//! Type a question and press Enter; the answer streams as it is generated. `/image FILE`
//! attaches an image to the next question, `/session` prints the conversation, `/quit` leaves.
//! Ctrl-C cancels the turn in progress (nothing of it is recorded), not the program.
//! `--once TEXT` asks one question (with `--image` files) and exits: for scripts.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, ChatRequest, CreateSessionRequest, GenerationParams, GetSessionRequest,
    TurnImage,
};
use clap::Parser;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(
    name = "blip2-chat",
    version,
    about = "Chat about images with a BLIP-2 session tier"
)]
struct Args {
    /// Address of the session tier.
    #[arg(
        long,
        env = "BLIP2_SESSION_ADDR",
        default_value = "http://127.0.0.1:50050"
    )]
    addr: String,
    /// Ask this one question and exit.
    #[arg(long)]
    once: Option<String>,
    /// Image attached to the first question (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Most tokens per answer.
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// Continue an existing session instead of creating one.
    #[arg(long)]
    session: Option<String>,
}

struct Chat {
    client: SessionServiceClient<Channel>,
    session_id: String,
    params: GenerationParams,
}

enum TurnEnd {
    Done,
    Cancelled,
}

impl Chat {
    async fn ask(&mut self, text: &str, images: Vec<PathBuf>) -> Result<TurnEnd> {
        let images = images
            .iter()
            .map(|path| {
                std::fs::read(path)
                    .with_context(|| format!("reading {}", path.display()))
                    .map(|data| TurnImage {
                        source: Some(turn_image::Source::Data(data)),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let request = ChatRequest {
            session_id: self.session_id.clone(),
            text: text.to_string(),
            images,
            params: Some(self.params.clone()),
            idempotency_key: String::new(),
        };
        let mut stream = self.client.chat(request).await?.into_inner();
        let mut stdout = std::io::stdout();
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    None => break,
                    Some(Err(status)) => {
                        println!();
                        anyhow::bail!("{}: {}", status.code(), status.message());
                    }
                    Some(Ok(event)) => match event.kind {
                        Some(chat_event::Kind::Text(piece)) => {
                            print!("{piece}");
                            stdout.flush().ok();
                        }
                        Some(chat_event::Kind::Done(done)) => {
                            let usage = done.usage.unwrap_or_default();
                            println!();
                            eprintln!(
                                "[{} prompt + {} generated tokens]",
                                usage.prompt_tokens, usage.generated_tokens
                            );
                        }
                        None => {}
                    },
                },
                _ = tokio::signal::ctrl_c() => {
                    // Dropping the stream cancels the call: the server records nothing.
                    println!();
                    eprintln!("[cancelled]");
                    return Ok(TurnEnd::Cancelled);
                }
            }
        }
        Ok(TurnEnd::Done)
    }

    async fn print_session(&mut self) -> Result<()> {
        let session = self
            .client
            .get_session(GetSessionRequest {
                session_id: self.session_id.clone(),
            })
            .await?
            .into_inner();
        for (i, turn) in session.turns.iter().enumerate() {
            let images = if turn.image_ids.is_empty() {
                String::new()
            } else {
                format!(" [{} image(s)]", turn.image_ids.len())
            };
            println!(
                "{}. Q: {}{images}\n   A: {}",
                i + 1,
                turn.question,
                turn.answer
            );
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut client = SessionServiceClient::connect(args.addr.clone())
        .await
        .with_context(|| format!("connecting to the session tier at {}", args.addr))?;
    let session_id = match args.session {
        Some(id) => id,
        None => {
            client
                .create_session(CreateSessionRequest::default())
                .await?
                .into_inner()
                .session_id
        }
    };
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        ..GenerationParams::default()
    };
    let mut chat = Chat {
        client,
        session_id,
        params,
    };
    if let Some(question) = args.once {
        return match chat.ask(&question, args.images).await? {
            TurnEnd::Done => Ok(()),
            TurnEnd::Cancelled => std::process::exit(130),
        };
    }
    eprintln!(
        "session {} — /image FILE attaches an image, /session shows the history, /quit leaves",
        chat.session_id
    );
    let mut pending_images = args.images;
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    loop {
        print!("> ");
        std::io::stdout().flush().ok();
        let Some(line) = lines.recv().await else {
            break;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" {
            break;
        }
        if line == "/session" {
            if let Err(e) = chat.print_session().await {
                eprintln!("error: {e:#}");
            }
            continue;
        }
        if let Some(path) = line.strip_prefix("/image ") {
            let path = PathBuf::from(path.trim());
            if path.is_file() {
                eprintln!("[{} attached to the next question]", path.display());
                pending_images.push(path);
            } else {
                eprintln!("error: {} is not a file", path.display());
            }
            continue;
        }
        let images = std::mem::take(&mut pending_images);
        if let Err(e) = chat.ask(line, images).await {
            eprintln!("error: {e:#}");
        }
    }
    Ok(())
}
