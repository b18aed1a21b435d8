-- socket.http with the site CA pinned, for the ELM11 client run by run_elm11.lua.
-- lua-socket speaks https through LuaSec (Debian's lua-sec), whose default is
-- verify = "none": any certificate would do. This is socket.http with, for an https://
-- URL, the peer verified against CAFILE only, and the certificate's subjectAltName (DNS
-- names, IP addresses) checked against the URL's host, which LuaSec 1.2 does not do.
--   package.loaded["socket.http"] = require("pinned_http")("ca.crt")
local http = require("socket.http")
local https = require("ssl.https")
local url = require("socket.url")

local function names(cert, host)
    local san = cert:extensions()["2.5.29.17"] or {}
    for _, kind in ipairs({"dNSName", "iPAddress"}) do
        for _, name in ipairs(san[kind] or {}) do
            if name:lower() == host:lower() then return true end
        end
    end
    return false
end

return function(cafile)
    local pinned = setmetatable({}, {__index = http})
    function pinned.request(reqt, body)
        if type(reqt) ~= "table" or url.parse(reqt.url).scheme ~= "https" then
            return http.request(reqt, body)
        end
        local make = https.tcp({protocol = "any", options = {"all", "no_sslv2", "no_sslv3", "no_tlsv1"},
                                verify = {"peer", "fail_if_no_peer_cert"}, cafile = cafile})
        reqt.create = function()
            local conn = make()
            local connect = conn.connect
            function conn:connect(host, port)
                connect(self, host, port)  -- throws (caught by socket.http) when the chain is not the CA's
                if not names(self.sock:getpeercertificate(), host) then
                    self.sock:close()
                    return nil, "certificate does not name " .. host
                end
                return 1
            end
            return conn
        end
        return http.request(reqt)
    end
    return pinned
end
