//! `pushhub pub TOPIC [DATA]`: one publish, or one per line of stdin, each acknowledgement
//! printed as the server's JSON line.

use std::io::Write as _;

use tokio::io::AsyncBufReadExt;

use super::{ClientError, PubArgs};

/// Publishes `args.data`, or each line of stdin; prints each answer (`{"id":…}`) on stdout.
/// Stops at the first refusal.
pub async fn publish(args: PubArgs) -> Result<(), ClientError> {
    let mut connection = args.server.connection();
    let path = format!("/topics/{}", args.topic);
    let mut send = async |data: &str| -> Result<(), ClientError> {
        let body = as_json(data);
        let answer = connection
            .post_json(&path, body.as_bytes())
            .await
            .map_err(|e| ClientError::Failed(format!("{}: {e}", args.server.url)))?;
        if !(200..300).contains(&answer.status) {
            return Err(ClientError::answered(answer.status, &answer.body));
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&answer.body);
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
        Ok(())
    };
    if let Some(data) = &args.data {
        return send(data).await;
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| ClientError::Failed(format!("stdin: {e}")))?
    {
        if !line.trim().is_empty() {
            send(&line).await?;
        }
    }
    Ok(())
}

/// `data` as a JSON body: itself when it is JSON, else a JSON string of it.
fn as_json(data: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(_) => data.to_owned(),
        Err(_) => serde_json::Value::from(data).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::as_json;

    #[test]
    fn text_that_is_not_json_is_sent_as_a_string() {
        assert_eq!(as_json(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(as_json("42"), "42");
        assert_eq!(as_json("hello \"world\""), r#""hello \"world\"""#);
    }
}
