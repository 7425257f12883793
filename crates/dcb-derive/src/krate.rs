//! The path generated code uses to reach the runtime types.
use proc_macro2::{Span, TokenStream};
use proc_macro_crate::{crate_name, FoundCrate};
use quote::quote;

/// `::crablet` (or its renamed name) when the user's crate depends on crablet, else
/// `::dcb_core`; an explicit `#[crablet(crate = path)]` wins.
pub fn runtime_path(explicit: Option<&syn::Path>) -> TokenStream {
    if let Some(path) = explicit {
        return quote!(#path);
    }
    for package in ["crablet", "dcb-core"] {
        match crate_name(package) {
            // The library itself never uses its derives: "itself" is one of its examples,
            // tests or doctests, which see it as an extern crate.
            Ok(FoundCrate::Itself) => {
                let ident = syn::Ident::new(&package.replace('-', "_"), Span::call_site());
                return quote!(::#ident);
            }
            Ok(FoundCrate::Name(name)) => {
                let ident = syn::Ident::new(&name, Span::call_site());
                return quote!(::#ident);
            }
            Err(_) => {}
        }
    }
    quote!(::crablet)
}
