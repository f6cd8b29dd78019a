//! Runs `gitops/argocd/health.lua` the way Argo CD does: Lua 5.1 with only the base, table,
//! string and math libraries, the object (JSON nulls dropped) as the global `obj`, and the
//! script's returned table read for `status` and `message`.

use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Table};
use serde_json::Value;

/// Path of the health script.
pub fn script_path() -> std::path::PathBuf {
    sd35_e2e::repo_root().join("gitops/argocd/health.lua")
}

/// The (status, message) the health script gives `object`.
pub fn health(object: &Value) -> mlua::Result<(String, String)> {
    let script = std::fs::read_to_string(script_path()).map_err(mlua::Error::external)?;
    let lua = Lua::new_with(
        StdLib::TABLE | StdLib::STRING | StdLib::MATH,
        LuaOptions::default(),
    )?;
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.globals()
        .set("obj", lua.to_value_with(object, options)?)?;
    let hs: Table = lua.load(script).set_name("health.lua").eval()?;
    Ok((hs.get("status")?, hs.get("message")?))
}
