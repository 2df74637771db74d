//! `tollgate keys`: API keys, issued, listed, revoked, rotated and imported.

use tollgate::{
    admin::{Admin, KeyOptions},
    store::ApiKeyRecord,
};

use crate::{
    opt::KeyCommand,
    util::{now, parse_time, secs, time_text, Result},
};

pub(crate) async fn keys(admin: &Admin, command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::Issue { tenant, expires_in, expires_at, test, scopes } => {
            let mut options = KeyOptions::default().test(test);
            if let Some(scopes) = scopes {
                options = options.scopes(scopes);
            }
            if let Some(d) = expires_in {
                options = options.expiring(now().saturating_add(secs(*d)));
            }
            if let Some(at) = expires_at {
                options = options.expiring(parse_time(&at)?);
            }
            let issued = admin.issue_key(&tenant, options).await?;
            out!("{}", issued.key);
            eprintln!(
                "key {} issued for `{tenant}` with scopes {}{}; it is shown only now, the store keeps its hash",
                issued.record.id,
                issued.record.scopes,
                issued.record.expires_at.map_or(String::new(), |at| format!(", expires {}", time_text(at)))
            );
        }
        KeyCommand::Scopes { tenant, id, scopes } => {
            let k = admin.set_key_scopes(&tenant, &id, scopes).await?;
            out!("key {} of `{tenant}` has scopes {}", k.id, k.scopes);
        }
        KeyCommand::List { tenant } => {
            let now = now();
            out!("{:<16} {:<16} {:<22} {:<22} scopes", "id", "prefix", "created (UTC)", "expires");
            for k in admin.keys(&tenant).await? {
                print_key(&k, now);
            }
        }
        KeyCommand::Revoke { tenant, id } => {
            let k = admin.revoke_key(&tenant, &id).await?;
            out!("key {} of `{tenant}` revoked", k.id);
        }
        KeyCommand::Rotate { tenant, id, grace } => {
            let until = now().saturating_add(secs(*grace));
            let issued = admin.rotate_key(&tenant, &id, until).await?;
            out!("{}", issued.key);
            eprintln!(
                "key {} issued for `{tenant}`; key {id} keeps working until {} (or its own earlier expiry); the new key is shown only now",
                issued.record.id,
                time_text(until)
            );
        }
        KeyCommand::Import { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?
            };
            let r = admin.import_csv(&text).await.map_err(|e| format!("{}: {e}", file.display()))?;
            out!("imported: {} tenants created, {} updated, {} keys", r.tenants_created, r.tenants_updated, r.keys);
        }
    }
    Ok(())
}

fn print_key(k: &ApiKeyRecord, now: i64) {
    let prefix = if k.prefix.is_empty() { "(hash only)".to_owned() } else { format!("{}…", k.prefix) };
    let expires = match k.expires_at {
        None => "never".to_owned(),
        Some(at) if at <= now => format!("{} (expired)", time_text(at)),
        Some(at) => time_text(at),
    };
    out!("{:<16} {:<16} {:<22} {expires:<22} {}", k.id, prefix, time_text(k.created_at), k.scopes);
}
