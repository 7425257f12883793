//! Misuse of the derives fails at compile time with a message that says what to do.
#[test]
fn misuse_of_the_derives_does_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/compile_fail/*.rs");
}
