//! `warren image import|ls|rm|prune` and `warren pull`: the server's image store.

use std::process::ExitCode;

use warren_proto::v1::{self, pull_image_progress::Event};

use super::{Globals, ServerError, answer};
use crate::output::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout: a directory, or a .tar (optionally gzipped) of one.
    Import {
        /// Path to the layout (resolved on this machine; the server reads it).
        path: std::path::PathBuf,
        /// Name to give the image (NAME[:TAG]); the layout's ref names otherwise.
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        /// Output: table, name, json or yaml.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove image names (an id removes all its names); unused layers are freed.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove the images no name points to (left when a name is imported or pulled again);
    /// with --all, every image. Images in use (by sandboxes, checkpoints, warm pools) are
    /// kept, saying by what.
    Prune {
        /// Every image, named or not, that nothing uses.
        #[arg(long, short = 'a')]
        all: bool,
    },
    /// Pull an image from a registry (same as `warren pull`).
    Pull(PullArgs),
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// Image reference: busybox, localhost:5000/app:1.0, registry/repo@sha256:...
    reference: String,
    /// Use plain http (a registry on localhost without TLS).
    #[arg(long)]
    insecure: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    match args.command {
        ImageCommand::Import { path, name } => {
            let path = std::path::absolute(&path)?;
            let mut client = g.connect_images().await?;
            let reply = answer(
                client
                    .import_image(v1::ImportImageRequest {
                        path: path.display().to_string(),
                        name,
                    })
                    .await,
            )?;
            for image in reply.images {
                println!(
                    "imported {} {}",
                    short_id(&image.id),
                    image.names.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Ls { output } => {
            let mut client = g.connect_images().await?;
            let reply = answer(client.list_images(v1::ListImagesRequest {}).await)?;
            print_images(&reply.images, output)?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rm { names } => {
            let mut client = g.connect_images().await?;
            let mut failed = false;
            for name in names {
                match client
                    .remove_image(v1::RemoveImageRequest { name: name.clone() })
                    .await
                {
                    Ok(r) => {
                        let image = r.into_inner().image.unwrap_or_default();
                        println!("removed {name} ({})", short_id(&image.id));
                    }
                    Err(s) => {
                        eprintln!("error: {}", ServerError(s));
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        ImageCommand::Prune { all } => prune(all, g).await,
        ImageCommand::Pull(args) => pull(args, g).await,
    }
}

/// `warren image prune`: removes by id each image without names (or every one, `all`); the
/// server refuses those in use, which are kept.
async fn prune(all: bool, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect_images().await?;
    let images = answer(client.list_images(v1::ListImagesRequest {}).await)?.images;
    let (mut removed, mut kept, mut failed) = (0, 0, false);
    for image in images.iter().filter(|i| all || i.names.is_empty()) {
        let shown = match image.names.as_slice() {
            [] => short_id(&image.id).to_string(),
            names => format!("{} ({})", short_id(&image.id), names.join(", ")),
        };
        match client
            .remove_image(v1::RemoveImageRequest {
                name: image.id.clone(),
            })
            .await
        {
            Ok(_) => {
                println!("removed {shown}");
                removed += 1;
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                println!("kept {shown}: {}", s.message());
                kept += 1;
            }
            Err(s) => {
                eprintln!("error: {shown}: {}", ServerError(s));
                failed = true;
            }
        }
    }
    println!("{removed} image(s) removed, {kept} in use kept");
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn pull(args: PullArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal as _;
    let mut client = g.connect_images().await?;
    let mut progress = answer(
        client
            .pull_image(v1::PullImageRequest {
                reference: args.reference.clone(),
                insecure: args.insecure,
            })
            .await,
    )?;
    let bar = if args.quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    };
    let mut layers: std::collections::BTreeMap<String, u64> = Default::default();
    loop {
        let msg = match progress.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                bar.abandon();
                anyhow::bail!("the server ended the pull without a result");
            }
            Err(s) => {
                bar.abandon();
                return Err(ServerError(s).into());
            }
        };
        match msg.event {
            Some(Event::Resolved(r)) => {
                bar.set_length(r.total_bytes);
                bar.set_message(format!("{} ({} layers)", r.reference, r.layers));
            }
            Some(Event::Layer(l)) => {
                layers.insert(l.digest, l.done);
                bar.set_position(layers.values().sum());
            }
            Some(Event::Unpacking(d)) => {
                bar.set_message(format!("unpacking {}", short_id(&d)));
            }
            Some(Event::Done(image)) => {
                bar.finish_and_clear();
                println!("pulled {} {}", short_id(&image.id), image.names.join(", "));
                return Ok(ExitCode::SUCCESS);
            }
            None => {}
        }
    }
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

fn print_images(images: &[v1::Image], format: Format) -> anyhow::Result<()> {
    let rows: Vec<serde_json::Value> = images
        .iter()
        .map(|i| {
            serde_json::json!({
                "id": i.id,
                "names": i.names,
                "size": i.size,
                "layers": i.layers,
                "kind": i.kind,
                "created": i.created,
            })
        })
        .collect();
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Yaml => print!("{}", yaml_serde::to_string(&rows)?),
        Format::Name => {
            for i in images {
                for n in &i.names {
                    println!("{n}");
                }
            }
        }
        _ => {
            let mut table = Vec::new();
            for i in images {
                let names = if i.names.is_empty() {
                    vec!["<none>".to_string()]
                } else {
                    i.names.clone()
                };
                for n in names {
                    table.push(vec![
                        n,
                        short_id(&i.id).to_string(),
                        i.kind.clone(),
                        warren_spec::format_bytes(i.size),
                        i.layers.to_string(),
                    ]);
                }
            }
            crate::output::table(&["NAME", "ID", "KIND", "SIZE", "LAYERS"], &table);
        }
    }
    Ok(())
}
