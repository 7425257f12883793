//! `#[derive(DomainEvent)]`.
use crate::attrs::{event_attrs, field_attrs, no_generics, EventAttrPlace};
use crate::krate::runtime_path;
use crate::serde_attrs::{self, ContainerSerde, FieldSerde, SerdePlace};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Error, Fields, Ident, LitStr, Result, Type};

/// A local of the generated code: mixed-site hygiene keeps it apart from the user's fields,
/// which the generated code binds as locals of their own names.
fn local(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

/// Field names the generated payload structs use themselves.
const RESERVED_PREFIX: &str = "__crablet";

/// How a tag field holds its values.
enum TagKind {
    /// `T`: exactly one value.
    Single,
    /// `Vec<T>`: any number of values, in order.
    Many,
    /// `Option<T>`: none or one.
    Optional,
}

struct Field {
    ident: Ident,
    ty: Type,
    /// The tag key and how the field holds its values, for a tag field.
    tag: Option<(LitStr, TagKind)>,
    /// The serde attributes of a payload field (`None` for a tag field).
    serde: Option<FieldSerde>,
}

/// The layout of one event type: a struct, or one inline variant of an enum.
struct Shape {
    event_type: LitStr,
    version: u32,
    /// The Rust name (`Type` or `Enum::Variant`), for errors.
    rust_name: String,
    /// Container serde attributes forwarded to the payload structs.
    serde: ContainerSerde,
    /// `None` for a unit struct or unit variant.
    fields: Option<Vec<Field>>,
}

enum Variant {
    Inline(Ident, Shape),
    /// `Variant(Inner)`, where `Inner` is a typed event itself.
    Delegate(Ident, Type),
}

pub fn expand(input: DeriveInput) -> Result<TokenStream> {
    no_generics(&input.generics, "DomainEvent")?;
    let name = &input.ident;
    match &input.data {
        Data::Struct(data) => {
            let attrs = event_attrs(&input.attrs, EventAttrPlace::Struct)?;
            let krate = runtime_path(attrs.krate.as_ref());
            let serde = serde_attrs::container(&input.attrs, SerdePlace::Struct)?;
            let rust_name = name.unraw().to_string();
            let shape = shape(name, rust_name, serde, &attrs, &data.fields, &krate)?;
            Ok(expand_struct(
                name,
                &shape,
                attrs.upcasters.as_ref(),
                &krate,
            ))
        }
        Data::Enum(data) => {
            let attrs = event_attrs(&input.attrs, EventAttrPlace::Enum)?;
            let krate = runtime_path(attrs.krate.as_ref());
            let enum_serde = serde_attrs::container(&input.attrs, SerdePlace::Enum)?;
            let mut variants = Vec::new();
            let mut seen: Vec<String> = Vec::new();
            for variant in &data.variants {
                let variant_attrs = event_attrs(&variant.attrs, EventAttrPlace::Variant)?;
                match &variant.fields {
                    Fields::Unnamed(unnamed) => {
                        if unnamed.unnamed.len() != 1
                            || variant_attrs.event_type.is_some()
                            || variant_attrs.version.is_some()
                        {
                            return Err(Error::new(
                                variant.span(),
                                "a tuple variant wraps exactly one typed event (a type that \
                                 derives DomainEvent), which names its own event type and version; \
                                 give inline events named fields",
                            ));
                        }
                        serde_attrs::container(&variant.attrs, SerdePlace::Delegate)?;
                        let inner = &unnamed.unnamed[0];
                        if let Some(attr) =
                            inner.attrs.iter().find(|a| a.path().is_ident("crablet"))
                        {
                            return Err(Error::new(
                                attr.span(),
                                "the wrapped typed event declares its own tags",
                            ));
                        }
                        variants.push(Variant::Delegate(variant.ident.clone(), inner.ty.clone()));
                    }
                    fields => {
                        let serde = ContainerSerde::for_variant(
                            &enum_serde,
                            serde_attrs::container(&variant.attrs, SerdePlace::Variant)?,
                        );
                        let rust_name = format!("{}::{}", name.unraw(), variant.ident.unraw());
                        let shape = shape(
                            &variant.ident,
                            rust_name,
                            serde,
                            &variant_attrs,
                            fields,
                            &krate,
                        )?;
                        let event_type = shape.event_type.value();
                        if seen.contains(&event_type) {
                            return Err(Error::new(
                                shape.event_type.span(),
                                format!(
                                    "two variants have the event type {event_type:?}; give one \
                                     of them another with #[crablet(event_type = \"...\")]"
                                ),
                            ));
                        }
                        seen.push(event_type);
                        variants.push(Variant::Inline(variant.ident.clone(), shape));
                    }
                }
            }
            if variants.is_empty() {
                return Err(Error::new(
                    name.span(),
                    "an enum of typed events needs at least one variant",
                ));
            }
            let kind = attrs
                .kind
                .clone()
                .unwrap_or_else(|| quote::format_ident!("{}Kind", name.unraw()));
            let kind_method = match &attrs.kind_method {
                None => Some(Ident::new("kind", Span::call_site())),
                Some(chosen) => chosen.clone(),
            };
            let mut expanded = expand_enum(name, &variants, attrs.upcasters.as_ref(), &krate);
            expanded.extend(expand_kind(
                name,
                &kind,
                kind_method.as_ref(),
                &input.vis,
                &variants,
                &krate,
            ));
            Ok(expanded)
        }
        Data::Union(_) => Err(Error::new(
            name.span(),
            "DomainEvent is derived for structs and enums, not unions",
        )),
    }
}

fn shape(
    ident: &Ident,
    rust_name: String,
    serde: ContainerSerde,
    attrs: &crate::attrs::EventAttrs,
    fields: &Fields,
    krate: &TokenStream,
) -> Result<Shape> {
    let support = quote!(#krate::derive_support);
    let event_type = attrs
        .event_type
        .clone()
        .unwrap_or_else(|| LitStr::new(&ident.unraw().to_string(), ident.span()));
    let version = match &attrs.version {
        Some(v) => v.base10_parse()?,
        None => 1,
    };
    let fields = match fields {
        Fields::Unit => None,
        Fields::Unnamed(unnamed) => return Err(Error::new(
            unnamed.span(),
            "a typed event needs named fields: they name the payload's JSON fields and the tags",
        )),
        Fields::Named(named) => {
            let mut out: Vec<Field> = Vec::new();
            for field in &named.named {
                let ident = field
                    .ident
                    .clone()
                    .ok_or_else(|| Error::new(field.span(), "a typed event needs named fields"))?;
                if ident.unraw().to_string().starts_with(RESERVED_PREFIX) {
                    return Err(Error::new(
                        ident.span(),
                        format!(
                            "field names starting with `{RESERVED_PREFIX}` are reserved for the \
                             code the derive generates"
                        ),
                    ));
                }
                let field_attrs = field_attrs(&field.attrs)?;
                let tag = match field_attrs.tag {
                    None => None,
                    Some(key) => {
                        serde_attrs::refuse_on_tag(&field.attrs)?;
                        // `r#type` is the field `type`: its key too.
                        let key = key.unwrap_or_else(|| {
                            LitStr::new(&ident.unraw().to_string(), ident.span())
                        });
                        if let Some(other) = out.iter().find(|f| {
                            f.tag
                                .as_ref()
                                .is_some_and(|(k, _)| k.value() == key.value())
                        }) {
                            return Err(Error::new(
                                key.span(),
                                format!(
                                    "the tag key {:?} is already the key of field `{}`; a key with \
                                     several values is one `Vec` field",
                                    key.value(),
                                    other.ident
                                ),
                            ));
                        }
                        Some((key, tag_kind(&field.ty)))
                    }
                };
                let serde = match tag {
                    Some(_) => None,
                    None => Some(serde_attrs::field(
                        &field.attrs,
                        &ident,
                        &field.ty,
                        &support,
                    )?),
                };
                out.push(Field {
                    ident,
                    ty: field.ty.clone(),
                    tag,
                    serde,
                });
            }
            Some(out)
        }
    };
    Ok(Shape {
        event_type,
        version,
        rust_name,
        serde,
        fields,
    })
}

/// `Vec<T>` and `Option<T>`, by the last segment of their path; anything else is one value.
fn tag_kind(ty: &Type) -> TagKind {
    if let Type::Path(path) = ty {
        if let Some(last) = path.path.segments.last() {
            if matches!(last.arguments, syn::PathArguments::AngleBracketed(_)) {
                if last.ident == "Vec" {
                    return TagKind::Many;
                }
                if last.ident == "Option" {
                    return TagKind::Optional;
                }
            }
        }
    }
    TagKind::Single
}

fn serde_crate(krate: &TokenStream) -> LitStr {
    LitStr::new(
        &format!("{krate}::derive_support::serde").replace(' ', ""),
        Span::call_site(),
    )
}

/// The expression encoding `shape`, with each field bound by reference to a local of its name.
fn encode_shape(shape: &Shape, krate: &TokenStream) -> TokenStream {
    let event_type = &shape.event_type;
    let version = shape.version;
    let fields = shape.fields.as_deref().unwrap_or(&[]);
    let support = quote!(#krate::derive_support);
    let tags = local("tags");
    let push_tags = fields.iter().filter_map(|f| {
        let (key, kind) = f.tag.as_ref()?;
        let ident = &f.ident;
        let function = match kind {
            TagKind::Single => quote!(push_tag),
            TagKind::Many => quote!(push_tags),
            TagKind::Optional => quote!(push_optional_tag),
        };
        Some(quote_spanned!(f.ty.span()=> #support::#function(&mut #tags, #key, #ident);))
    });
    let payload: Vec<(&Field, &FieldSerde)> = fields
        .iter()
        .filter_map(|f| f.serde.as_ref().map(|serde| (f, serde)))
        .collect();
    let payload_idents: Vec<&Ident> = payload.iter().map(|(f, _)| &f.ident).collect();
    let payload_types = payload.iter().map(|(f, _)| &f.ty);
    let payload_attrs = payload.iter().map(|(_, serde)| &serde.ser);
    let helpers = payload.iter().map(|(_, serde)| &serde.helpers);
    let container = &shape.serde.both;
    let serde_crate = serde_crate(krate);
    quote! {{
        let mut #tags = ::std::vec::Vec::new();
        #(#push_tags)*
        #(#helpers)*
        #[derive(#support::serde::Serialize)]
        #[serde(crate = #serde_crate)]
        #( #[serde(#container)] )*
        struct __CrabletPayload<'__crablet> {
            #( #payload_attrs #payload_idents: &'__crablet #payload_types, )*
            #[serde(skip)]
            __crablet_marker: ::std::marker::PhantomData<&'__crablet ()>,
        }
        #support::new_event(
            #event_type,
            #version,
            #tags,
            &__CrabletPayload { #(#payload_idents,)* __crablet_marker: ::std::marker::PhantomData },
        )
    }}
}

/// The expression decoding the local `view` (stored at version `stored`) into `constructor`
/// (`Self` or `Self::Variant`).
fn decode_shape(shape: &Shape, constructor: TokenStream, krate: &TokenStream) -> TokenStream {
    let version = shape.version;
    let rust_name = &shape.rust_name;
    let support = quote!(#krate::derive_support);
    let view = local("view");
    let stored = local("stored");
    let payload_local = local("payload");
    let Some(fields) = &shape.fields else {
        return quote! {{
            #support::check_version(&#view, #stored, #version)?;
            #support::unit_payload(&#view, #rust_name)?;
            ::std::result::Result::Ok(#constructor)
        }};
    };
    let tag_values = fields.iter().filter_map(|f| {
        let (key, kind) = f.tag.as_ref()?;
        let ident = &f.ident;
        let function = match kind {
            TagKind::Single => quote!(tag),
            TagKind::Many => quote!(tags),
            TagKind::Optional => quote!(optional_tag),
        };
        Some(quote_spanned!(f.ty.span()=> #ident: #support::#function(&#view, #key)?,))
    });
    let payload: Vec<(&Field, &FieldSerde)> = fields
        .iter()
        .filter_map(|f| f.serde.as_ref().map(|serde| (f, serde)))
        .collect();
    let payload_idents: Vec<&Ident> = payload.iter().map(|(f, _)| &f.ident).collect();
    let payload_types = payload.iter().map(|(f, _)| &f.ty);
    let payload_attrs = payload.iter().map(|(_, serde)| &serde.de);
    let container = shape.serde.both.iter().chain(&shape.serde.de);
    // serde's errors say what they expected: the user's type, not the generated one.
    let expecting = (!shape
        .serde
        .de
        .iter()
        .any(|meta| meta.path().is_ident("expecting")))
    .then(|| {
        let text = format!("struct {rust_name}");
        quote!(#[serde(expecting = #text)])
    });
    let serde_crate = serde_crate(krate);
    quote! {{
        #support::check_version(&#view, #stored, #version)?;
        #[derive(#support::serde::Deserialize)]
        #[serde(crate = #serde_crate)]
        #expecting
        #( #[serde(#container)] )*
        struct __CrabletPayload {
            #( #payload_attrs #payload_idents: #payload_types, )*
        }
        let #payload_local: __CrabletPayload = #support::payload(&#view)?;
        ::std::result::Result::Ok(#constructor {
            #(#tag_values)*
            #( #payload_idents: #payload_local.#payload_idents, )*
        })
    }}
}

fn bindings(shape: &Shape) -> TokenStream {
    match &shape.fields {
        None => quote!(),
        Some(fields) => {
            let idents = fields.iter().map(|f| &f.ident);
            quote!({ #(#idents,)* })
        }
    }
}

fn upcasters_fn(upcasters: Option<&syn::Path>, krate: &TokenStream) -> TokenStream {
    match upcasters {
        None => quote!(),
        Some(path) => quote! {
            fn upcasters() -> &'static #krate::Upcasters {
                static UPCASTERS: ::std::sync::OnceLock<#krate::Upcasters> =
                    ::std::sync::OnceLock::new();
                #krate::derive_support::cached_upcasters(&UPCASTERS, #path)
            }
        },
    }
}

fn expand_struct(
    name: &Ident,
    shape: &Shape,
    upcasters: Option<&syn::Path>,
    krate: &TokenStream,
) -> TokenStream {
    let event_type = &shape.event_type;
    let version = shape.version;
    let binding = bindings(shape);
    let encode = encode_shape(shape, krate);
    let decode = decode_shape(shape, quote!(Self), krate);
    let upcasters = upcasters_fn(upcasters, krate);
    let decodes = decodes_fn(krate);
    let view = local("view");
    let stored = local("stored");
    quote! {
        impl #name {
            /// The event type this struct encodes to.
            pub const EVENT_TYPE: &'static str = #event_type;
        }

        impl #krate::DomainEvent for #name {
            fn event_types() -> ::std::vec::Vec<&'static str> {
                ::std::vec![#event_type]
            }

            #upcasters

            fn event_type(&self) -> &'static str {
                #event_type
            }

            fn schema_version(&self) -> u32 {
                #version
            }

            #[allow(unused_variables)]
            fn encode(&self) -> ::std::result::Result<#krate::NewEvent, #krate::Error> {
                let Self #binding = self;
                #encode
            }

            #decodes

            fn decode_view(
                #view: #krate::EventView<'_>,
            ) -> ::std::result::Result<Self, #krate::DecodeErrorKind> {
                let #stored = #view.version;
                let #view = <Self as #krate::DomainEvent>::upcasters().apply(#view)?;
                if #view.event_type != #event_type {
                    return ::std::result::Result::Err(#krate::derive_support::unknown_type(
                        ::std::vec![#event_type],
                    ));
                }
                #decode
            }
        }
    }
}

/// `decodes`, on read types computed once: enums ask it of their wrapped events per event.
fn decodes_fn(krate: &TokenStream) -> TokenStream {
    quote! {
        fn decodes(event_type: &str) -> bool {
            static READ_TYPES: ::std::sync::OnceLock<::std::vec::Vec<::std::string::String>> =
                ::std::sync::OnceLock::new();
            READ_TYPES
                .get_or_init(<Self as #krate::DomainEvent>::read_types)
                .iter()
                .any(|t| t == event_type)
        }
    }
}

fn expand_enum(
    name: &Ident,
    variants: &[Variant],
    upcasters: Option<&syn::Path>,
    krate: &TokenStream,
) -> TokenStream {
    let support = quote!(#krate::derive_support);
    let trait_ = quote!(#krate::DomainEvent);
    let mut event_types = Vec::new();
    let mut event_type_arms = Vec::new();
    let mut version_arms = Vec::new();
    let mut encode_arms = Vec::new();
    let mut decode_branches = Vec::new();
    let mut read_types = Vec::new();
    let view = local("view");
    let stored = local("stored");
    for variant in variants {
        match variant {
            Variant::Inline(ident, shape) => {
                let event_type = &shape.event_type;
                let version = shape.version;
                let binding = bindings(shape);
                let encode = encode_shape(shape, krate);
                let decode = decode_shape(shape, quote!(Self::#ident), krate);
                event_types.push(quote!(types.push(#event_type);));
                read_types.push(quote!(
                    ::std::vec![::std::string::String::from(#event_type)]
                ));
                event_type_arms.push(quote!(Self::#ident { .. } => #event_type,));
                version_arms.push(quote!(Self::#ident { .. } => #version,));
                encode_arms.push(quote!(Self::#ident #binding => #encode,));
                decode_branches.push(quote! {
                    if #view.event_type == #event_type {
                        return #decode;
                    }
                });
            }
            Variant::Delegate(ident, inner) => {
                event_types.push(quote!(types.extend(<#inner as #trait_>::event_types());));
                event_type_arms.push(quote!(Self::#ident(inner) => #trait_::event_type(inner),));
                version_arms.push(quote!(Self::#ident(inner) => #trait_::schema_version(inner),));
                encode_arms.push(quote!(Self::#ident(inner) => #trait_::encode(inner),));
                decode_branches.push(quote! {
                    if <#inner as #trait_>::decodes(&#view.event_type) {
                        return <#inner as #trait_>::decode_view(#view).map(Self::#ident);
                    }
                });
                read_types.push(quote!(<#inner as #trait_>::read_types()));
            }
        }
    }
    let upcasters = upcasters_fn(upcasters, krate);
    let decodes = decodes_fn(krate);
    quote! {
        impl #trait_ for #name {
            fn event_types() -> ::std::vec::Vec<&'static str> {
                let mut types = ::std::vec::Vec::new();
                #(#event_types)*
                types
            }

            fn read_types() -> ::std::vec::Vec<::std::string::String> {
                #support::read_types(
                    ::std::vec![#(#read_types),*],
                    <Self as #trait_>::upcasters(),
                )
            }

            #upcasters

            fn event_type(&self) -> &'static str {
                match self {
                    #(#event_type_arms)*
                }
            }

            fn schema_version(&self) -> u32 {
                match self {
                    #(#version_arms)*
                }
            }

            #[allow(unused_variables)]
            fn encode(&self) -> ::std::result::Result<#krate::NewEvent, #krate::Error> {
                match self {
                    #(#encode_arms)*
                }
            }

            #decodes

            #[allow(unused_variables)]
            fn decode_view(
                #view: #krate::EventView<'_>,
            ) -> ::std::result::Result<Self, #krate::DecodeErrorKind> {
                let #stored = #view.version;
                let #view = <Self as #trait_>::upcasters().apply(#view)?;
                #(#decode_branches)*
                ::std::result::Result::Err(#support::unknown_type(<Self as #trait_>::event_types()))
            }
        }
    }
}

/// The kind enum of an enum of typed events: one unit variant per variant, for typed queries
/// of some of them (`QueryItem::of_kinds`).
fn expand_kind(
    name: &Ident,
    kind: &Ident,
    kind_method: Option<&Ident>,
    vis: &syn::Visibility,
    variants: &[Variant],
    krate: &TokenStream,
) -> TokenStream {
    let trait_ = quote!(#krate::DomainEvent);
    let mut idents = Vec::new();
    let mut types_arms = Vec::new();
    let mut kind_arms = Vec::new();
    for variant in variants {
        match variant {
            Variant::Inline(ident, shape) => {
                let event_type = &shape.event_type;
                types_arms.push(quote!(
                    Self::#ident => ::std::vec![::std::string::String::from(#event_type)],
                ));
                kind_arms.push(quote!(#name::#ident { .. } => #kind::#ident,));
                idents.push(ident);
            }
            Variant::Delegate(ident, inner) => {
                types_arms.push(quote!(Self::#ident => <#inner as #trait_>::read_types(),));
                kind_arms.push(quote!(#name::#ident(..) => #kind::#ident,));
                idents.push(ident);
            }
        }
    }
    let doc = format!(
        "The kinds of [`{name}`] events, one per variant: `QueryItem::of_kinds([{kind}::..])` \
         selects some of them by their event types."
    );
    let kind_doc = format!("The kind of this event, a [`{kind}`].");
    let from_doc = format!("The kind of a [`{name}`] event.");
    let method = kind_method.map(|method| {
        quote! {
            impl #name {
                #[doc = #kind_doc]
                #[allow(dead_code)]
                pub fn #method(&self) -> #kind {
                    ::std::convert::From::from(self)
                }
            }
        }
    });
    quote! {
        #[doc = #doc]
        #[derive(::std::fmt::Debug, ::std::clone::Clone, ::std::marker::Copy, ::std::cmp::PartialEq, ::std::cmp::Eq, ::std::hash::Hash)]
        #vis enum #kind {
            #(
                #[allow(missing_docs)]
                #idents,
            )*
        }

        impl #krate::EventKind for #kind {
            fn read_types(self) -> ::std::vec::Vec<::std::string::String> {
                let types = match self {
                    #(#types_arms)*
                };
                #krate::derive_support::read_types(
                    ::std::vec![types],
                    <#name as #trait_>::upcasters(),
                )
            }
        }

        impl ::std::convert::From<&#name> for #kind {
            #[doc = #from_doc]
            fn from(event: &#name) -> Self {
                match event {
                    #(#kind_arms)*
                }
            }
        }

        #method
    }
}
