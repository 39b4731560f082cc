//! `Properties.Set` on one of our read-only properties must fail with
//! `org.freedesktop.DBus.Error.PropertyReadOnly`, as the D-Bus specification says; zbus's
//! generated interface answers `UnknownProperty` for a property without a setter, which tells a
//! client the property does not exist. `ReadOnlyProperties` wraps the generated interface,
//! delegates everything to it, and turns exactly that case into the right error.
//!
//! zbus marks its `Interface` trait as one to implement by hand only when the macro is not
//! enough; a thin delegation like this one is that case (pinned by the crate's exact version,
//! and `tests/dbus.rs` checks both the error and that introspection is unchanged).

use std::collections::HashMap;
use std::fmt::Write;

use zbus::message::{Header, Message};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{BoxDBusError, Connection, ObjectServer, OwnedVariant, Variant};

use crate::service::Segmenter1;

/// Every property of `org.minisam.Segmenter1`; all are read-only. A unit test compares this
/// list with the interface's introspection, so a new property cannot be forgotten here.
pub const PROPERTIES: &[&str] = &["ActiveModel", "ActiveAdapter", "Backend", "MemoryUse", "FramesServed", "LastError"];

pub struct ReadOnlyProperties(pub Segmenter1);

#[async_trait::async_trait]
impl Interface for ReadOnlyProperties {
    fn name() -> InterfaceName<'static> {
        <Segmenter1 as Interface>::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.0.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        self.0.get(property_name, server, connection, header, emitter).await
    }

    async fn get_all(
        &self,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::fdo::Result<HashMap<String, OwnedVariant>> {
        self.0.get_all(server, connection, header, emitter).await
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        value: &'call Variant<'_>,
        server: &'call ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult<'call> {
        match self.0.set(property_name, value, server, connection, header, emitter) {
            DispatchResult::NotFound if PROPERTIES.contains(&property_name) => DispatchResult::Async(Box::pin(async move {
                Err(zbus::fdo::Error::PropertyReadOnly(format!("property {property_name} is read-only")).into())
            })),
            other => other,
        }
    }

    async fn set_mut(
        &mut self,
        property_name: &str,
        value: &Variant<'_>,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        self.0.set_mut(property_name, value, server, connection, header, emitter).await
    }

    fn call<'call>(&'call self, server: &'call ObjectServer, connection: &'call Connection, msg: &'call Message, name: MemberName<'call>) -> DispatchResult<'call> {
        self.0.call(server, connection, msg, name)
    }

    fn call_mut<'call>(&'call mut self, server: &'call ObjectServer, connection: &'call Connection, msg: &'call Message, name: MemberName<'call>) -> DispatchResult<'call> {
        self.0.call_mut(server, connection, msg, name)
    }

    fn introspect_to_writer(&self, writer: &mut dyn Write, level: usize) {
        self.0.introspect_to_writer(writer, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_property_in_the_interface_is_listed_and_read_only() {
        let xml = include_str!("../org.minisam.Segmenter1.xml");
        let mut found: Vec<&str> = Vec::new();
        for line in xml.lines().map(str::trim).filter(|l| l.starts_with("<property ")) {
            let name = line.split("name=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
            assert!(line.contains("access=\"read\""), "{name} is not read-only: PropertyReadOnly would be wrong for it");
            found.push(name);
        }
        found.sort_unstable();
        let mut listed = PROPERTIES.to_vec();
        listed.sort_unstable();
        assert_eq!(found, listed);
    }
}
