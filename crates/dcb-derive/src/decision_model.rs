//! `#[derive(DecisionModel)]`.
use crate::attrs::{model_attrs, no_generics};
use crate::krate::runtime_path;
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Error, Fields, Result};

pub fn expand(input: DeriveInput) -> Result<TokenStream> {
    no_generics(&input.generics, "DecisionModel")?;
    let name = &input.ident;
    let attrs = model_attrs(&input.attrs)?;
    let krate = runtime_path(attrs.krate.as_ref());
    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) if !named.named.is_empty() => &named.named,
            _ => {
                return Err(Error::new(
                    name.span(),
                    "a decision model is a struct with named projector fields",
                ))
            }
        },
        _ => {
            return Err(Error::new(
                name.span(),
                "a decision model is a struct with named projector fields",
            ))
        }
    };
    let state = attrs
        .state
        .unwrap_or_else(|| format_ident!("{}State", name.unraw()));
    let derives = attrs
        .state_derive
        .unwrap_or_else(|| vec![syn::parse_quote!(Debug), syn::parse_quote!(Clone)]);
    let vis = &input.vis;
    let idents: Vec<_> = fields.iter().filter_map(|f| f.ident.as_ref()).collect();
    let types: Vec<_> = fields.iter().map(|f| &f.ty).collect();
    let docs = fields.iter().map(|f| {
        let docs: Vec<_> = f
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .collect();
        quote!(#(#docs)*)
    });
    let projectors = quote!(#krate::Projectors);
    let newest_only = if idents.len() == 1 {
        let only = idents[0];
        quote!(#projectors::newest_only(&self.#only))
    } else {
        quote!(false)
    };
    let state_doc =
        format!("The states of the decision model [`{name}`], one field per projector.");
    Ok(quote! {
        #[doc = #state_doc]
        #[derive(#(#derives),*)]
        // The states are what the model is for: wherever the model is visible, so are they,
        // whatever its projector fields' visibility (those stay private to build the model).
        #vis struct #state {
            #( #docs #vis #idents: <#types as #projectors>::States, )*
        }

        impl #projectors for #name {
            type States = #state;

            fn len(&self) -> usize {
                0 #( + #projectors::len(&self.#idents) )*
            }

            fn collect_queries<'__a>(&'__a self, into: &mut ::std::vec::Vec<&'__a #krate::Query>) {
                #( #projectors::collect_queries(&self.#idents, into); )*
            }

            fn initial(&self) -> #state {
                #state { #( #idents: #projectors::initial(&self.#idents), )* }
            }

            fn apply(
                &self,
                states: &mut #state,
                event: &#krate::Event,
            ) -> ::std::result::Result<(), #krate::Error> {
                #( #projectors::apply(&self.#idents, &mut states.#idents, event)?; )*
                ::std::result::Result::Ok(())
            }

            fn newest_only(&self) -> bool {
                #newest_only
            }
        }
    })
}
