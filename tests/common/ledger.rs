//! Counts of what clients were told versus what the database holds, and the
//! single-writer invariants checked over them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Ack {
    pub object: String,
    pub key: String,
    pub version: i64,
    pub fence: i64,
    pub instance: String,
    pub at: Instant,
}

#[derive(Default)]
pub struct Ledger {
    pub acks: Mutex<Vec<Ack>>,
    /// Definite refusals (409 fenced, 412): must not be stored.
    pub refused: Mutex<Vec<(String, String)>>,
    /// 503s and transport errors: the outcome is unknown to the client.
    pub unknown: Mutex<Vec<(String, String)>>,
    /// Why each unknown outcome happened (the problem detail or the transport error).
    pub unknown_reasons: Mutex<Vec<String>>,
}

pub enum Outcome {
    Acked(Ack),
    Refused,
    Unknown,
}

impl Ledger {
    /// One PUT of `key` (its own value) to `object` through `base`.
    pub async fn put(&self, client: &reqwest::Client, base: &str, ns: &str, object: &str, key: &str) -> Outcome {
        let url = format!("{base}/v1/objects/{ns}/{object}/kv/{key}");
        let outcome = match client.put(&url).body(key.to_string()).send().await {
            Ok(r) if r.status() == 200 => {
                let fence = header_i64(&r, "statehouse-fence");
                let instance = r.headers()["statehouse-instance"].to_str().unwrap().to_string();
                let body: Value = r.json().await.unwrap();
                Outcome::Acked(Ack {
                    object: object.to_string(),
                    key: key.to_string(),
                    version: body["version"].as_i64().unwrap(),
                    fence,
                    instance,
                    at: Instant::now(),
                })
            }
            Ok(r) if r.status() == 409 || r.status() == 412 => Outcome::Refused,
            Ok(r) if r.status() == 503 => {
                let detail = r.text().await.unwrap_or_default();
                if std::env::var("LEDGER_DEBUG").is_ok() {
                    eprintln!("503 from {base}: {detail}");
                }
                self.unknown_reasons.lock().unwrap().push(format!("503 from {base}: {detail}"));
                Outcome::Unknown
            }
            Ok(r) => panic!("unexpected answer {} from {url}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(err) => {
                self.unknown_reasons.lock().unwrap().push(format!("{base}: {err}"));
                Outcome::Unknown
            }
        };
        let entry = (object.to_string(), key.to_string());
        match &outcome {
            Outcome::Acked(ack) => self.acks.lock().unwrap().push(ack.clone()),
            Outcome::Refused => self.refused.lock().unwrap().push(entry),
            Outcome::Unknown => self.unknown.lock().unwrap().push(entry),
        }
        outcome
    }

    pub fn acked(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    /// Reads every object back and checks the invariants; prints the counts.
    pub async fn verify(&self, label: &str, client: &reqwest::Client, base: &str, ns: &str, objects: &[String]) {
        let acks = self.acked();
        let refused: HashSet<(String, String)> = self.refused.lock().unwrap().iter().cloned().collect();
        let mut stored_total = 0;
        for object in objects {
            let stored = stored_keys(client, base, ns, object).await;
            stored_total += stored.len();
            let info: Value =
                client.get(format!("{base}/v1/objects/{ns}/{object}")).send().await.unwrap().json().await.unwrap();
            // Every committed write added one new key and bumped the version once:
            // nothing committed was lost, nothing was committed twice.
            assert_eq!(info["version"].as_i64().unwrap() as usize, stored.len(), "{object}: version != stored writes");
            let mut versions: Vec<i64> = stored.values().copied().collect();
            versions.sort();
            versions.dedup();
            assert_eq!(versions.len(), stored.len(), "{object}: two stored writes share a version");

            let mut mine: Vec<&Ack> = acks.iter().filter(|a| &a.object == object).collect();
            for ack in &mine {
                assert_eq!(
                    stored.get(&ack.key),
                    Some(&ack.version),
                    "{object}: acknowledged write {} lost or changed",
                    ack.key
                );
            }
            mine.sort_by_key(|a| a.version);
            for pair in mine.windows(2) {
                assert!(pair[0].version < pair[1].version, "{object}: version {} acknowledged twice", pair[0].version);
                assert!(
                    pair[0].fence <= pair[1].fence,
                    "{object}: fence went backwards at version {}",
                    pair[1].version
                );
            }
            let mut owner_of_fence: HashMap<i64, &str> = HashMap::new();
            for ack in &mine {
                let owner = owner_of_fence.entry(ack.fence).or_insert(&ack.instance);
                assert_eq!(*owner, ack.instance, "{object}: fence {} acknowledged by two owners", ack.fence);
            }
            for (o, key) in &refused {
                if o == object {
                    assert!(!stored.contains_key(key), "{object}: refused write {key} was stored");
                }
            }
        }
        let unknown = self.unknown.lock().unwrap().len();
        println!(
            "{label}: acknowledged={} stored={} refused={} unknown_outcome={} (stored-but-unacknowledged={})",
            acks.len(),
            stored_total,
            refused.len(),
            unknown,
            stored_total - acks.len()
        );
        assert!(stored_total >= acks.len());
        assert!(stored_total <= acks.len() + unknown, "more writes stored than acknowledged or in doubt");
    }
}

fn header_i64(r: &reqwest::Response, name: &str) -> i64 {
    r.headers()[name].to_str().unwrap().parse().unwrap()
}

/// Every key of an object with the version it was written at.
pub async fn stored_keys(client: &reqwest::Client, base: &str, ns: &str, object: &str) -> BTreeMap<String, i64> {
    let mut keys = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/objects/{ns}/{object}/kv?values=false&limit=10000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let body: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
        for item in body["items"].as_array().unwrap() {
            keys.insert(item["key"].as_str().unwrap().to_string(), item["version"].as_i64().unwrap());
        }
        match body["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return keys,
        }
    }
}

pub fn summarize(durations: &[Duration]) -> String {
    let mut ms: Vec<u128> = durations.iter().map(|d| d.as_millis()).collect();
    ms.sort();
    let avg = ms.iter().sum::<u128>() / ms.len().max(1) as u128;
    format!("n={} min={}ms avg={}ms max={}ms", ms.len(), ms.first().unwrap_or(&0), avg, ms.last().unwrap_or(&0))
}
