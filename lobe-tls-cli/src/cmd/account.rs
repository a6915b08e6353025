//! `lobe-tls account`: show the ACME account of `--directory` and `--email`, roll its
//! key over, or deactivate it. Works on any store (directory or Redis).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use lobe_tls::acme::account::{self, AccountInfo};
use lobe_tls::{Error, Result};

use crate::global::Global;

/// Options of `lobe-tls account`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: AccountCommand,
}

/// What to do with the account.
#[derive(clap::Subcommand, Debug)]
pub enum AccountCommand {
    /// Show the account: directory, account URL, contacts, status at the CA, key type.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replace the account key with a new one at the CA (RFC 8555 key change) and store it.
    Rollover {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Deactivate the account at the CA, for good: the CA refuses it from then on.
    Deactivate {
        /// Do not ask for confirmation (needed without a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// Runs the command.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let acme = global.acme_config()?;
    let store = global.open_existing_store().await?;
    match &args.command {
        AccountCommand::Show { json } => {
            print_info(&account::show(&acme, store.as_ref()).await?, *json)?;
        }
        AccountCommand::Rollover { json } => {
            let info = account::rollover(&acme, store.as_ref()).await?;
            if !json {
                println!("rolled the account key over");
            }
            print_info(&info, *json)?;
        }
        AccountCommand::Deactivate { yes } => {
            // Read first, so that a wrong --directory or --email fails before the prompt.
            let info = account::show(&acme, store.as_ref()).await?;
            if !yes && !confirm(&info)? {
                println!("not deactivated");
                return Ok(ExitCode::from(1));
            }
            let info = account::deactivate(&acme, store.as_ref()).await?;
            println!("deactivated {} at {}", info.url, info.directory);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm(info: &AccountInfo) -> Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::config(
            "account deactivate cannot be undone and there is no terminal to confirm it: pass --yes",
        ));
    }
    eprint!(
        "Deactivate the account {} at {}? The CA will refuse it for good. Type yes: ",
        info.url, info.directory
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::config(format!("cannot read the answer: {e}")))?;
    Ok(answer.trim().eq_ignore_ascii_case("yes"))
}

fn print_info(info: &AccountInfo, json: bool) -> Result<()> {
    if json {
        let text = serde_json::to_string_pretty(info)
            .map_err(|e| Error::config(format!("cannot encode JSON: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    let contacts = if info.contacts.is_empty() {
        "-".to_owned()
    } else {
        info.contacts.join(", ")
    };
    println!("directory: {}", info.directory);
    println!("account:   {}", info.url);
    println!("contacts:  {contacts}");
    println!("status:    {}", info.status);
    println!("key type:  {}", info.key_type);
    Ok(())
}
