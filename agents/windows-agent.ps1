#Requires -Version 5.1
<#
.SYNOPSIS
  vm-healthcheck Windows agent: sends this VM's CPU, RAM, disk and uptime to the server.
.DESCRIPTION
  -Once           send one report now; exit 1 if it was not accepted.
  -Tick           one Scheduled Task cycle: replay the spool, then report (several times a
                  minute when INTERVAL_SECONDS is below 60, as a task repeats at most once a
                  minute).
  -Enrol          forget this VM's credential and enrol again with AGENT_TOKEN.
  -SetCredential  store a new credential read from standard input (never the command line).
  Config: %ProgramData%\vm-healthcheck\agent.conf (KEY=VALUE: SERVER_URL, AGENT_TOKEN,
  INTERVAL_SECONDS, optional VMID, NODE, CREDENTIAL_FILE, INSECURE); an environment variable
  of the same name wins.
  AGENT_TOKEN only enrols: the server answers the first accepted report with this VM's own
  credential, kept in CREDENTIAL_FILE (default: "credential" beside agent.conf, SYSTEM and
  Administrators only) and sent instead of the token from then on.
#>
[CmdletBinding()]
param(
    [switch]$Once,
    [switch]$Tick,
    [switch]$Enrol,
    [switch]$SetCredential,
    [string]$ConfigPath = (Join-Path $env:ProgramData 'vm-healthcheck\agent.conf')
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$AgentVersion = '1.0.0'
$StateDir = Join-Path $env:ProgramData 'vm-healthcheck'
$SpoolDir = Join-Path $StateDir 'spool'
$SpoolMax = 100
# What the server's credentials look like; nothing else is stored or sent as one.
$CredentialPattern = '^vmhc_vm_[0-9a-f]{64}$'

# Windows PowerShell 5.1 may default to TLS 1.0; servers behind TLS need 1.2.
[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12

function Write-AgentLog([string]$Message) {
    Write-Host ('{0} vm-healthcheck-agent: {1}' -f (Get-Date).ToUniversalTime().ToString('yyyy-MM-ddTHH:mm:ssZ'), $Message)
}

# Reads the config; -ForReports also checks what sending a report needs (nothing has been
# sent when this throws).
function Read-AgentConfig([switch]$ForReports) {
    $config = @{ SERVER_URL = ''; AGENT_TOKEN = ''; INTERVAL_SECONDS = '30'; VMID = ''; NODE = ''
        CREDENTIAL_FILE = ''; INSECURE = 'false' }
    if (Test-Path -LiteralPath $ConfigPath) {
        foreach ($line in Get-Content -LiteralPath $ConfigPath) {
            if ($line -match '^\s*([A-Z_]+)\s*=\s*(.*?)\s*$' -and $config.ContainsKey($Matches[1])) {
                $config[$Matches[1]] = $Matches[2].Trim('"', "'")
            }
        }
    }
    foreach ($key in @($config.Keys)) {
        $fromEnv = [Environment]::GetEnvironmentVariable($key)
        if ($fromEnv) { $config[$key] = $fromEnv }
    }
    # By default the credential lives beside agent.conf.
    if (-not $config.CREDENTIAL_FILE) { $config.CREDENTIAL_FILE = Join-Path (Split-Path -Parent $ConfigPath) 'credential' }
    if ($ForReports) {
        if (-not $config.SERVER_URL) { throw "SERVER_URL is not set (in $ConfigPath or the environment)" }
        $config.SERVER_URL = $config.SERVER_URL.TrimEnd('/')
        if ($config.SERVER_URL -match '^http://') {
            # The token and this VM's credential would cross the network in clear.
            if ($config.INSECURE -ne 'true') {
                throw ("refusing to report to $($config.SERVER_URL): over http:// the agent token and this VM's credential " +
                    "cross the network in clear; use https:// (for example behind a TLS reverse proxy), or set INSECURE=true in $ConfigPath to accept that")
            }
        } elseif ($config.SERVER_URL -notmatch '^https://') {
            throw "SERVER_URL must start with https:// (or http:// with INSECURE=true): $($config.SERVER_URL)"
        }
        $config.INTERVAL_SECONDS = [int]$config.INTERVAL_SECONDS
        if ($config.INTERVAL_SECONDS -lt 1) { throw 'INTERVAL_SECONDS must be a positive integer' }
    }
    return $config
}

# Sets AUTH_KIND and AUTH_SECRET: this VM's credential when it has one (never falling back to
# the token), else the enrolment token.
function Set-AgentAuth($Config) {
    if (Test-Path -LiteralPath $Config.CREDENTIAL_FILE) {
        $credential = ([IO.File]::ReadAllText($Config.CREDENTIAL_FILE)).Trim()
        if ($credential -cnotmatch $CredentialPattern) {
            throw "$($Config.CREDENTIAL_FILE) holds no credential: store one with windows-agent.ps1 -SetCredential or enrol again with windows-agent.ps1 -Enrol"
        }
        $Config.AUTH_KIND = 'credential'
        $Config.AUTH_SECRET = $credential
    } else {
        if (-not $Config.AGENT_TOKEN) { throw "AGENT_TOKEN is not set (in $ConfigPath or the environment) and this VM has no credential ($($Config.CREDENTIAL_FILE))" }
        $Config.AUTH_KIND = 'token'
        $Config.AUTH_SECRET = $Config.AGENT_TOKEN
    }
}

# Writes this VM's credential atomically: a temporary file created with an ACL for SYSTEM and
# Administrators only (as agent.conf) beside it, then moved over it, so it is never readable
# by others, not even briefly.
function Save-Credential($Config, [string]$Credential) {
    if ($Credential -cnotmatch $CredentialPattern) { throw 'that is no credential (vmhc_vm_ and 64 hex digits)' }
    $path = $Config.CREDENTIAL_FILE
    $dir = Split-Path -Parent $path
    New-Item -ItemType Directory -Force -Path $dir | Out-Null
    $security = New-Object System.Security.AccessControl.FileSecurity
    $security.SetAccessRuleProtection($true, $false)
    foreach ($sid in @('S-1-5-18', 'S-1-5-32-544')) {
        $identity = New-Object System.Security.Principal.SecurityIdentifier($sid)
        $rule = New-Object System.Security.AccessControl.FileSystemAccessRule($identity, 'FullControl', 'Allow')
        $security.AddAccessRule($rule)
    }
    $tmp = Join-Path $dir ('.credential.' + [Guid]::NewGuid().ToString('N'))
    try {
        # Created with its ACL in one step, before it holds anything.
        $stream = [IO.File]::Create($tmp, 4096, [IO.FileOptions]::WriteThrough, $security)
        try {
            $bytes = [Text.Encoding]::ASCII.GetBytes($Credential + "`r`n")
            $stream.Write($bytes, 0, $bytes.Length)
        } finally { $stream.Dispose() }
        if (Test-Path -LiteralPath $path) {
            [IO.File]::Replace($tmp, $path, $null)
        } else {
            [IO.File]::Move($tmp, $path)
        }
    } finally {
        if (Test-Path -LiteralPath $tmp) { Remove-Item -LiteralPath $tmp -Force }
    }
}

function New-Report($Config) {
    $os = Get-CimInstance -ClassName Win32_OperatingSystem
    $cpu = (Get-CimInstance -ClassName Win32_Processor | Measure-Object -Property LoadPercentage -Average).Average
    $uuid = (Get-CimInstance -ClassName Win32_ComputerSystemProduct).UUID
    $disks = @(Get-CimInstance -ClassName Win32_LogicalDisk -Filter 'DriveType=3' | ForEach-Object {
            # payload:disk:begin
            [ordered]@{
                mount       = [string]$_.DeviceID
                used_bytes  = [int64]($_.Size - $_.FreeSpace)
                total_bytes = [int64]$_.Size
            }
            # payload:disk:end
        })
    # payload:begin
    $report = [ordered]@{
        hostname        = [string]$env:COMPUTERNAME
        os              = 'windows'
        machine_id      = $null
        vmid            = $null
        node            = $null
        cpu_percent     = [double][Math]::Min(100, [Math]::Max(0, [double]$cpu))
        ram_used_bytes  = [int64](($os.TotalVisibleMemorySize - $os.FreePhysicalMemory) * 1024)
        ram_total_bytes = [int64]($os.TotalVisibleMemorySize * 1024)
        disks           = $disks
        uptime_seconds  = [int64]((Get-Date) - $os.LastBootUpTime).TotalSeconds
        agent_version   = $AgentVersion
        observed_at     = (Get-Date).ToUniversalTime().ToString('yyyy-MM-ddTHH:mm:ssZ')
    }
    # payload:end
    if ($uuid -match '^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$' -and $uuid -ne 'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF') {
        $report.machine_id = $uuid.ToLowerInvariant()
    } else { $report.Remove('machine_id') }
    if ($Config.VMID) { $report.vmid = [int64]$Config.VMID } else { $report.Remove('vmid') }
    if ($Config.NODE) { $report.node = [string]$Config.NODE } else { $report.Remove('node') }
    return (ConvertTo-Json -InputObject $report -Depth 4 -Compress)
}

# Reads an accepted report's answer: logs the server's warnings, and keeps the credential an
# enrolment answer carries.
function Read-Answer($Config, $Answer) {
    if ($null -eq $Answer -or $Answer -is [string]) { return }
    $warnings = $Answer.PSObject.Properties['warnings']
    if ($warnings) {
        foreach ($warning in @($warnings.Value)) { Write-AgentLog "warning from the server: $warning" }
    }
    $credential = $Answer.PSObject.Properties['credential']
    if ($credential -and $Config.AUTH_KIND -eq 'token') {
        try {
            Save-Credential $Config ([string]$credential.Value)
        } catch {
            Write-AgentLog ("error: the server enrolled this VM but its credential could not be stored in $($Config.CREDENTIAL_FILE) " +
                "($($_.Exception.Message)); fix that, then ask the admin for a new credential (-SetCredential) or re-enrol with -Enrol")
            return 'fatal'
        }
        $Config.AUTH_KIND = 'credential'
        $Config.AUTH_SECRET = [string]$credential.Value
        Write-AgentLog "enrolled: this VM's own credential is in $($Config.CREDENTIAL_FILE) and replaces the agent token"
    }
}

# Returns 'ok'; 'refused' (4xx but 429, or a wrong enrolment token: never retried); 'retry'
# (unreachable or failing: worth keeping in the spool); 'fatal' (this VM's credential was
# rejected, or its identity is enrolled by another credential: nothing more can be sent until
# an admin acts); 'fatal-accepted' (accepted, but its credential could not be stored).
function Send-Report($Config, [string]$Json) {
    $delay = 2
    for ($attempt = 1; $attempt -le 3; $attempt++) {
        $status = 0
        try {
            $answer = Invoke-RestMethod -Method Post -Uri ($Config.SERVER_URL + '/api/health/report') `
                -Headers @{ Authorization = 'Bearer ' + $Config.AUTH_SECRET } `
                -ContentType 'application/json' -Body ([Text.Encoding]::UTF8.GetBytes($Json)) -TimeoutSec 15 -UseBasicParsing
            if ((Read-Answer $Config $answer) -eq 'fatal') { return 'fatal-accepted' }
            return 'ok'
        } catch [System.Net.WebException] {
            if ($_.Exception.Response) { $status = [int]$_.Exception.Response.StatusCode }
        }
        if ($status -eq 401 -or $status -eq 403) {
            if ($Config.AUTH_KIND -eq 'credential') {
                Write-AgentLog ("the server rejected this VM's credential (revoked or rotated; HTTP $status): ask the admin for a new one " +
                    "(windows-agent.ps1 -SetCredential) or re-enrol with windows-agent.ps1 -Enrol")
                return 'fatal'
            }
            Write-AgentLog "the server rejected the agent token (HTTP $status): check AGENT_TOKEN in $ConfigPath"
            return 'refused'
        }
        if ($status -eq 409 -and $Config.AUTH_KIND -eq 'token') {
            Write-AgentLog ("this identity is already enrolled by another credential (HTTP 409): if that is this VM, install its credential " +
                "with windows-agent.ps1 -SetCredential, else ask the admin to revoke it, then run windows-agent.ps1 -Enrol")
            return 'fatal'
        }
        if ($status -ge 400 -and $status -lt 500 -and $status -ne 429) {
            Write-AgentLog "report refused (HTTP $status)"
            return 'refused'
        }
        if ($attempt -lt 3) { Start-Sleep -Seconds $delay; $delay *= 2 }
    }
    if ($status -eq 0) { Write-AgentLog "server $($Config.SERVER_URL) unreachable" } else { Write-AgentLog "server answered HTTP $status" }
    return 'retry'
}

function Save-ToSpool([string]$Json) {
    New-Item -ItemType Directory -Force -Path $SpoolDir | Out-Null
    $name = '{0:D20}-{1}.json' -f [DateTime]::UtcNow.Ticks, $PID
    [IO.File]::WriteAllText((Join-Path $SpoolDir $name), $Json)
    $files = @(Get-ChildItem -LiteralPath $SpoolDir -Filter '*.json' | Sort-Object Name)
    if ($files.Count -gt $SpoolMax) {
        $files | Select-Object -First ($files.Count - $SpoolMax) | Remove-Item -Force
    }
}

# Sends spooled reports oldest first (with the credential, once there is one). Returns 'ok'
# when the spool is empty, 'retry' when one could not be delivered yet, 'fatal' when nothing
# more can be sent.
function Send-Spool($Config) {
    if (-not (Test-Path -LiteralPath $SpoolDir)) { return 'ok' }
    foreach ($file in @(Get-ChildItem -LiteralPath $SpoolDir -Filter '*.json' | Sort-Object Name)) {
        $result = Send-Report $Config ([IO.File]::ReadAllText($file.FullName))
        if ($result -eq 'retry' -or $result -eq 'fatal') { return $result }
        Remove-Item -LiteralPath $file.FullName -Force
        if ($result -eq 'fatal-accepted') { return 'fatal' }
    }
    return 'ok'
}

# One cycle: replay what is spooled, then report now (or spool it). Returns as Send-Report,
# 'fatal-accepted' as 'fatal'.
function Invoke-Cycle($Config) {
    $json = New-Report $Config
    $result = Send-Spool $Config
    if ($result -eq 'ok') { $result = Send-Report $Config $json }
    # A report the server could not take, or that waits for this VM's credential to be
    # sorted out, is kept and sent later.
    if ($result -eq 'retry' -or $result -eq 'fatal') { Save-ToSpool $json }
    if ($result -eq 'fatal-accepted') { $result = 'fatal' }
    return $result
}

try {
    if ($SetCredential) {
        $config = Read-AgentConfig
        $credential = ([string][Console]::In.ReadLine()).Trim()
        if ($credential -cnotmatch $CredentialPattern) { throw 'standard input holds no credential (vmhc_vm_ and 64 hex digits); nothing changed' }
        Save-Credential $config $credential
        Write-AgentLog "stored this VM's new credential in $($config.CREDENTIAL_FILE)"
        exit 0
    }
    $config = Read-AgentConfig -ForReports
    if ($Enrol) {
        if (-not $config.AGENT_TOKEN) { throw "-Enrol needs AGENT_TOKEN (in $ConfigPath or the environment)" }
        if (Test-Path -LiteralPath $config.CREDENTIAL_FILE) { Remove-Item -LiteralPath $config.CREDENTIAL_FILE -Force }
    }
    Set-AgentAuth $config
    if ($Once -or $Enrol) {
        $result = Invoke-Cycle $config
        if ($result -ne 'ok') { Write-AgentLog "report not accepted by $($config.SERVER_URL)"; exit 1 }
        Write-AgentLog "report accepted by $($config.SERVER_URL)"
        if ($Enrol -and $config.AUTH_KIND -eq 'token') {
            Write-AgentLog 'the server issued no credential: this VM goes on reporting with the agent token'
        }
        exit 0
    }
    $runs = 1
    if ($Tick -and $config.INTERVAL_SECONDS -lt 60) { $runs = [Math]::Floor(60 / $config.INTERVAL_SECONDS) }
    for ($i = 1; $i -le $runs; $i++) {
        # Only an admin can help now: fail, so the task's last result shows it.
        if ((Invoke-Cycle $config) -eq 'fatal') { exit 1 }
        if ($i -lt $runs) { Start-Sleep -Seconds $config.INTERVAL_SECONDS }
    }
} catch {
    Write-AgentLog ('error: ' + $_.Exception.Message)
    exit 1
}
