//! "Add a VM": the install line for a new guest, carrying the agent script's SHA-256 so the
//! installer refuses any other script.

use crate::rpc::get_agent_install;
use leptos::prelude::*;

#[component]
pub fn AddVm() -> impl IntoView {
    let install = OnceResource::new(get_agent_install());
    view! {
        <Transition fallback=|| ()>
            {move || {
                install
                    .get()
                    .and_then(Result::ok)
                    .map(|info| {
                        let url = info.server_url;
                        let line = format!(
                            "curl -fsSL --cacert monitor.pem {url}/agents/install.sh -o install.sh\n\
                             sudo bash install.sh --server {url} --ca-file monitor.pem \\\n  \
                             --sha256 {} --token-file token.txt",
                            info.agent_sha256,
                        );
                        view! {
                            <details class="add-vm">
                                <summary>"Add a VM"</summary>
                                <p class="hint">
                                    "On the new Linux guest, with the server's certificate as monitor.pem "
                                    "(data/tls-cert.pem) and an enrolment token in token.txt:"
                                </p>
                                <pre class="install-line">{line}</pre>
                            </details>
                        }
                    })
            }}
        </Transition>
    }
}
