//! The example templates in `packaging/templates/` parse, and use the `command` provisioner
//! the way their comments say.

use std::path::Path;
use tether_coordinator::template::{ProvisionerKind, Template};

#[test]
fn packaging_templates_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/templates");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let template = Template::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(template.provisioner, ProvisionerKind::Command, "{}", path.display());
        let command = template.command.as_ref().expect("a [command] table");
        assert!(command.stop.is_some() && command.delete.is_some(), "{}: stop and delete", path.display());
        // The token reaches the workspace through the environment or stdin, never as an argument.
        assert!(!command.start.contains("TETHER_AGENT_TOKEN="), "{}: token on a command line", path.display());
        names.push(path.file_name().expect("file name").to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["docker.toml", "kubernetes.toml"]);
}

/// The packaged configuration file is what `tether config example` prints, so it lists every
/// setting this build has. Regenerate it with `tether config example > packaging/tether.toml`.
#[test]
fn packaged_configuration_file_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/tether.toml");
    let packaged = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        packaged == tether_coordinator::config::example(),
        "{} is out of date: run `tether config example > packaging/tether.toml`",
        path.display()
    );
}
