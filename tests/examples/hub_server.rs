//! The tests' loopback hub as a standalone server, for trying `pipeline prepare --source hub`
//! by hand without network:
//!
//! ```text
//! cargo run -p e2e --example hub_server -- [BYTES_PER_SEC]
//! HF_ENDPOINT=http://127.0.0.1:PORT HF_HOME=/tmp/hf pipeline prepare --tokens 3M --seq-len 128 \
//!     --eval-sequences 16 --out /tmp/shards
//! ```
//!
//! It serves `tests/fixtures/fineweb-edu-sample` as `HuggingFaceFW/fineweb-edu` and the fixture
//! tokenizer as `meta-llama/Llama-2-7b-hf` until killed; the optional rate slows downloads so
//! the progress bars can be watched.

use std::path::Path;

fn main() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut builder = e2e::hub::HubServer::builder()
        .dataset(
            "HuggingFaceFW/fineweb-edu",
            &fixtures.join("fineweb-edu-sample"),
        )
        .model_file(
            "meta-llama/Llama-2-7b-hf",
            "tokenizer.json",
            &fixtures.join("tokenizer/tokenizer.json"),
        );
    if let Some(rate) = std::env::args().nth(1).and_then(|r| r.parse().ok()) {
        builder = builder.bytes_per_sec(rate);
    }
    let hub = builder.start();
    println!("{}", hub.url());
    loop {
        std::thread::park();
    }
}
