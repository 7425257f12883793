//! The `#[crablet(...)]` attributes, parsed.
use syn::spanned::Spanned;
use syn::{Attribute, Error, LitInt, LitStr, Path, Result};

/// Attributes of a struct or enum deriving `DomainEvent`, or of an enum variant.
#[derive(Default)]
pub struct EventAttrs {
    pub event_type: Option<LitStr>,
    pub version: Option<LitInt>,
    pub upcasters: Option<Path>,
    pub krate: Option<Path>,
    /// The name of an enum's generated kind enum.
    pub kind: Option<syn::Ident>,
    /// The name of an enum's generated `kind()` method; `None` inside: no method.
    pub kind_method: Option<Option<syn::Ident>>,
}

/// Attributes of a field of a typed event.
#[derive(Default)]
pub struct FieldAttrs {
    /// `Some(key)` for a tag field; the key defaults to the field's name.
    pub tag: Option<Option<LitStr>>,
}

/// Attributes of a struct deriving `DecisionModel`.
#[derive(Default)]
pub struct ModelAttrs {
    pub state: Option<syn::Ident>,
    pub state_derive: Option<Vec<Path>>,
    pub krate: Option<Path>,
}

fn crablet_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("crablet"))
}

/// Where an [`EventAttrs`] sits: what it may hold differs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum EventAttrPlace {
    Struct,
    Enum,
    Variant,
}

pub fn event_attrs(attrs: &[Attribute], place: EventAttrPlace) -> Result<EventAttrs> {
    let mut parsed = EventAttrs::default();
    for attr in crablet_attrs(attrs) {
        attr.parse_nested_meta(|meta| {
            let allowed = |ok: bool, what: &str| {
                if ok {
                    Ok(())
                } else {
                    Err(meta.error(format!("`{what}` is not accepted here")))
                }
            };
            if meta.path.is_ident("event_type") {
                allowed(place != EventAttrPlace::Enum, "event_type")?;
                let name: LitStr = meta.value()?.parse()?;
                check_event_type(&name)?;
                parsed.event_type = Some(name);
            } else if meta.path.is_ident("version") {
                allowed(place != EventAttrPlace::Enum, "version")?;
                let version: LitInt = meta.value()?.parse()?;
                match version.base10_parse::<u32>() {
                    Ok(v) if v >= 1 => {}
                    _ => {
                        return Err(Error::new(
                            version.span(),
                            "a schema version is an integer of at least 1",
                        ))
                    }
                }
                parsed.version = Some(version);
            } else if meta.path.is_ident("upcasters") {
                allowed(place != EventAttrPlace::Variant, "upcasters")?;
                parsed.upcasters = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("crate") {
                allowed(place != EventAttrPlace::Variant, "crate")?;
                parsed.krate = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("kind") {
                allowed(place == EventAttrPlace::Enum, "kind")?;
                parsed.kind = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("kind_method") {
                allowed(place == EventAttrPlace::Enum, "kind_method")?;
                if parsed.kind_method.is_some() {
                    return Err(meta.error("`kind_method` and `no_kind_method` are given once"));
                }
                parsed.kind_method = Some(Some(meta.value()?.parse()?));
            } else if meta.path.is_ident("no_kind_method") {
                allowed(place == EventAttrPlace::Enum, "no_kind_method")?;
                if parsed.kind_method.is_some() {
                    return Err(meta.error("`kind_method` and `no_kind_method` are given once"));
                }
                parsed.kind_method = Some(None);
            } else {
                return Err(meta.error(
                    "unknown crablet attribute; expected `event_type = \"...\"`, `version = N`, \
                     `upcasters = path`, `kind = Name`, `kind_method = name` or \
                     `no_kind_method` (enums) or `crate = path`",
                ));
            }
            Ok(())
        })?;
    }
    Ok(parsed)
}

fn check_event_type(name: &LitStr) -> Result<()> {
    let value = name.value();
    if value.is_empty() || value.chars().count() > 64 || value.contains('\0') {
        return Err(Error::new(
            name.span(),
            "an event type is 1 to 64 characters without NUL",
        ));
    }
    Ok(())
}

pub fn field_attrs(attrs: &[Attribute]) -> Result<FieldAttrs> {
    let mut parsed = FieldAttrs::default();
    for attr in crablet_attrs(attrs) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("tag") {
                if meta.input.peek(syn::Token![=]) {
                    let key: LitStr = meta.value()?.parse()?;
                    let value = key.value();
                    if value.is_empty() || value.contains(':') || value.contains('\0') {
                        return Err(Error::new(
                            key.span(),
                            "a tag key is non-empty and holds neither `:` nor NUL",
                        ));
                    }
                    parsed.tag = Some(Some(key));
                } else {
                    parsed.tag = Some(None);
                }
                Ok(())
            } else {
                Err(meta
                    .error("unknown crablet field attribute; expected `tag` or `tag = \"key\"`"))
            }
        })?;
    }
    Ok(parsed)
}

pub fn model_attrs(attrs: &[Attribute]) -> Result<ModelAttrs> {
    let mut parsed = ModelAttrs::default();
    for attr in crablet_attrs(attrs) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("state") {
                parsed.state = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("state_derive") {
                let mut derives = Vec::new();
                meta.parse_nested_meta(|inner| {
                    derives.push(inner.path.clone());
                    Ok(())
                })?;
                parsed.state_derive = Some(derives);
            } else if meta.path.is_ident("crate") {
                parsed.krate = Some(meta.value()?.parse()?);
            } else {
                return Err(meta.error(
                    "unknown crablet attribute; expected `state = Name`, `state_derive(...)` or \
                     `crate = path`",
                ));
            }
            Ok(())
        })?;
    }
    Ok(parsed)
}

/// An error at `item` unless it has no generic parameters.
pub fn no_generics(generics: &syn::Generics, what: &str) -> Result<()> {
    if generics.params.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            generics.span(),
            format!("{what} cannot be derived for a generic type"),
        ))
    }
}
