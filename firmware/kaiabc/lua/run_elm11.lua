-- Runs the spec's ELM11 client (its text, only API_BASE, API_KEY and NODE_ID replaced)
-- against a gateway: lua5.1 run_elm11.lua CLIENT API_BASE API_KEY NODE_ID CYCLES [TEMP_C...]
-- read_bme280 and tmr are the board's; here they replay the temperatures given and stop
-- main_loop after CYCLES cycles. Each request's outcome is printed for the tests.
-- $KAIABC_CAFILE pins the site CA: the client's socket.http is then pinned_http.lua's
-- (an https:// API_BASE without it is refused: LuaSec alone would take any certificate).
local client, base, key, node, cycles = arg[1], arg[2], arg[3], arg[4], tonumber(arg[5])
local temps = {}
for i = 6, #arg do temps[#temps + 1] = tonumber(arg[i]) end

local f = assert(io.open(client))
local text = f:read("*a")
f:close()
local n
text, n = text:gsub('\nAPI_BASE = "[^"\n]*"', '\nAPI_BASE = "' .. base .. '"', 1)
assert(n == 1, "API_BASE not found")
text, n = text:gsub('\nAPI_KEY = "[^"\n]*"', '\nAPI_KEY = "' .. key .. '"', 1)
assert(n == 1, "API_KEY not found")
text, n = text:gsub('\nNODE_ID = "[^"\n]*"', '\nNODE_ID = "' .. node .. '"', 1)
assert(n == 1, "NODE_ID not found")
local cafile = os.getenv("KAIABC_CAFILE")
if cafile and cafile ~= "" then
    package.loaded["socket.http"] = require("pinned_http")(cafile)
elseif base:sub(1, 8) == "https://" then
    error("an https API_BASE needs the site CA pinned (KAIABC_CAFILE): LuaSec verifies nothing by default", 0)
end
assert(loadstring(text, "=elm11_client.lua"))()

local json = require("cjson")
local done = 0
function read_bme280()
    return temps[(done % #temps) + 1], 45.0, 101325
end
tmr = {delay = function(us)
    done = done + 1
    if done >= cycles then error("cycles done", 0) end
end}

local registered = register_node
register_node = function() local ok = registered(); print("registered " .. tostring(ok)); return ok end
local send = send_sensor_data
send_sensor_data = function(...) local r = send(...); print("batch " .. json.encode(r or json.null)); return r end
local state = get_current_state
get_current_state = function() local s = state(); print("state " .. json.encode(s or json.null)); return s end

local ok, err = pcall(main_loop)
assert(not ok and err == "cycles done", err)
print("done " .. done)
