//! The `#[serde(...)]` attributes of a typed event: which reach the generated payload
//! (de)serialization, how, and which are refused because the payload could not honour them.
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, Error, Expr, ExprLit, Ident, Lit, LitStr, Meta, Result, Token, Type};

/// Where container-like serde attributes sit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SerdePlace {
    Struct,
    Enum,
    /// An enum variant with inline fields.
    Variant,
    /// `Variant(Inner)`: the inner typed event has its own attributes.
    Delegate,
}

/// Container attributes forwarded to the generated payload structs.
#[derive(Default, Clone)]
pub struct ContainerSerde {
    /// For both the serialized and the deserialized payload (`rename_all`).
    pub both: Vec<Meta>,
    /// For the deserialized payload only (`deny_unknown_fields`, `expecting`).
    pub de: Vec<Meta>,
}

impl ContainerSerde {
    /// The attributes of one inline variant: the enum's `rename_all_fields` unless the variant
    /// has its own `rename_all` (as serde does), and the enum's `deny_unknown_fields`.
    pub fn for_variant(enum_level: &ContainerSerde, variant: ContainerSerde) -> ContainerSerde {
        let mut both = variant.both;
        if both.is_empty() {
            both = enum_level.both.clone();
        }
        let mut de = enum_level.de.clone();
        de.extend(variant.de);
        ContainerSerde { both, de }
    }
}

fn metas(attr: &Attribute) -> Result<Punctuated<Meta, Token![,]>> {
    attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
}

fn serde_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("serde"))
}

fn name_of(meta: &Meta) -> String {
    meta.path()
        .get_ident()
        .map(|i| i.unraw().to_string())
        .unwrap_or_default()
}

/// `meta` with its name replaced by `name` (`rename_all_fields = ".."` -> `rename_all = ".."`).
fn renamed(meta: &Meta, name: &str) -> Meta {
    let mut meta = meta.clone();
    let ident = Ident::new(name, meta.path().span());
    match &mut meta {
        Meta::Path(path) => *path = ident.into(),
        Meta::List(list) => list.path = ident.into(),
        Meta::NameValue(nv) => nv.path = ident.into(),
    }
    meta
}

/// The container attributes at `place`, or an error at the first one that would change the
/// payload in a way the generated code cannot reproduce.
pub fn container(attrs: &[Attribute], place: SerdePlace) -> Result<ContainerSerde> {
    let mut parsed = ContainerSerde::default();
    for attr in serde_attrs(attrs) {
        for meta in metas(attr)? {
            let name = name_of(&meta);
            let refuse = |why: &str| Err(Error::new(meta.span(), why.to_string()));
            match (place, name.as_str()) {
                (SerdePlace::Delegate, _) => {
                    return refuse(
                        "a wrapping variant takes no serde attributes: the wrapped typed event \
                         declares its own",
                    )
                }
                (SerdePlace::Struct | SerdePlace::Variant, "rename_all") => parsed.both.push(meta),
                (SerdePlace::Enum, "rename_all_fields") => {
                    parsed.both.push(renamed(&meta, "rename_all"))
                }
                (SerdePlace::Struct | SerdePlace::Enum, "deny_unknown_fields" | "expecting") => {
                    parsed.de.push(meta)
                }
                // They configure the type's own serde derive, if it has one, and never the
                // shape of the payload.
                (SerdePlace::Struct | SerdePlace::Enum, "crate" | "bound") => {}
                (SerdePlace::Enum, "rename_all") => {
                    return refuse(
                        "`#[serde(rename_all)]` on an enum renames its variants, and a typed \
                         event's variants are event types, named by \
                         `#[crablet(event_type = \"...\")]`; to rename the variants' payload \
                         fields write `#[serde(rename_all_fields = \"...\")]`",
                    )
                }
                (_, "rename" | "alias") => {
                    return refuse(
                        "`#[serde(rename)]` does not name a typed event: its event type is the \
                         type's or variant's name, or `#[crablet(event_type = \"...\")]`",
                    )
                }
                (_, "tag" | "content" | "untagged") => {
                    return refuse(
                        "a typed event's event type is stored as the event's type, not inside \
                         its payload: `#[serde(tag/content/untagged)]` is not supported",
                    )
                }
                (_, "default") => {
                    return refuse(
                        "`#[serde(default)]` on a typed event is not supported: put \
                         `#[serde(default)]` on each payload field that may be missing",
                    )
                }
                _ => {
                    return Err(Error::new(
                        meta.span(),
                        format!(
                            "`#[serde({name})]` is not supported here: the payload of a typed \
                             event takes `rename_all`{} and `deny_unknown_fields` on the {}",
                            if place == SerdePlace::Enum {
                                " (as `rename_all_fields` on an enum)"
                            } else {
                                ""
                            },
                            match place {
                                SerdePlace::Variant => "enum, `rename_all` on a variant",
                                _ => "type",
                            }
                        ),
                    ))
                }
            }
        }
    }
    Ok(parsed)
}

/// An error at the first serde attribute of a tag field: tags are not serialized by serde.
pub fn refuse_on_tag(attrs: &[Attribute]) -> Result<()> {
    match serde_attrs(attrs).next() {
        None => Ok(()),
        Some(attr) => Err(Error::new(
            attr.meta.path().span(),
            "serde attributes do not apply to a tag field: tags are not part of the JSON \
             payload (an empty `Vec` or a `None` already writes no tag); name the key with \
             `#[crablet(tag = \"key\")]`",
        )),
    }
}

/// A payload field's serde attributes, as the two generated payload structs need them.
pub struct FieldSerde {
    /// For the serialized payload, whose fields are references to the event's fields.
    pub ser: TokenStream,
    /// For the deserialized payload: the attributes as written.
    pub de: TokenStream,
    /// Functions the rewritten `ser` attributes call, taking the field by reference to it.
    pub helpers: TokenStream,
}

fn path_of(value: &Expr) -> Result<(LitStr, syn::ExprPath)> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok((lit.clone(), lit.parse()?)),
        other => Err(Error::new(other.span(), "expected a path in a string")),
    }
}

fn is_option(ty: &Type) -> bool {
    match ty {
        Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "Option"),
        _ => false,
    }
}

/// The serde attributes of the payload field `ident: ty`. Those that call a function with the
/// field are rewritten to call it through a helper, since the serialized payload holds a
/// reference to the field; those that leave a field out when serializing need a way back
/// (`default`, or an `Option`) so that what is written decodes.
pub fn field(
    attrs: &[Attribute],
    ident: &Ident,
    ty: &Type,
    support: &TokenStream,
) -> Result<FieldSerde> {
    let mut ser = Vec::new();
    let mut de = Vec::new();
    let mut helpers = TokenStream::new();
    let mut omitted: Option<Meta> = None;
    let mut has_default = false;
    let mut custom_de = false;
    let field = ident.unraw();
    for attr in serde_attrs(attrs) {
        de.push(quote!(#attr));
        for meta in metas(attr)? {
            match (name_of(&meta).as_str(), &meta) {
                ("skip_serializing_if", Meta::NameValue(nv)) => {
                    let (lit, path) = path_of(&nv.value)?;
                    let helper = format_ident!("__crablet_skip_{}", field);
                    helpers.extend(quote! {
                        #[allow(non_snake_case)]
                        fn #helper(value: &&#ty) -> bool {
                            #path(*value)
                        }
                    });
                    let name = LitStr::new(&helper.to_string(), lit.span());
                    ser.push(quote!(skip_serializing_if = #name));
                    omitted = Some(meta.clone());
                }
                ("serialize_with" | "with", Meta::NameValue(nv)) => {
                    let (lit, path) = path_of(&nv.value)?;
                    let target = if name_of(&meta) == "with" {
                        custom_de = true;
                        quote!(#path::serialize)
                    } else {
                        quote!(#path)
                    };
                    let helper = format_ident!("__crablet_serialize_{}", field);
                    helpers.extend(quote! {
                        #[allow(non_snake_case)]
                        fn #helper<__S: #support::serde::Serializer>(
                            value: &&#ty,
                            serializer: __S,
                        ) -> ::std::result::Result<__S::Ok, __S::Error> {
                            #target(*value, serializer)
                        }
                    });
                    let name = LitStr::new(&helper.to_string(), lit.span());
                    ser.push(quote!(serialize_with = #name));
                }
                ("skip_serializing", _) => {
                    omitted = Some(meta.clone());
                    ser.push(quote!(#meta));
                }
                ("default" | "skip" | "skip_deserializing", _) => {
                    has_default = true;
                    ser.push(quote!(#meta));
                }
                ("deserialize_with", _) => {
                    custom_de = true;
                    ser.push(quote!(#meta));
                }
                _ => ser.push(quote!(#meta)),
            }
        }
    }
    if let Some(meta) = omitted {
        // serde fills a missing `Option` with `None`, unless a custom deserializer reads it.
        let missing_is_none = is_option(ty) && !custom_de;
        if !has_default && !missing_is_none {
            return Err(Error::new(
                meta.span(),
                "a payload field that serialization may leave out must decode when it is \
                 missing: add `#[serde(default)]` (or make it an `Option`), or what is \
                 written would not read back",
            ));
        }
    }
    let ser = if ser.is_empty() {
        TokenStream::new()
    } else {
        quote!(#[serde(#(#ser),*)])
    };
    Ok(FieldSerde {
        ser,
        de: quote!(#(#de)*),
        helpers,
    })
}
